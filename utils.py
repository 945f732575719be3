"""Small helpers shared by the trial and the commands: atomic files, writable directories,
terminal tables and durations, a command's exit status."""

import contextlib
import os
import sys
import tempfile
from typing import Any, Callable, Iterator, List, Tuple, Type

from config import ConfigError


def writable_directory(path: str, what: str) -> str:
    """The one rule for a directory the user names for output: create it (with its parents) if
    needed and write a file there, before any work. Any OSError (a file in the way, no
    permission, a read-only mount, /proc) becomes one line naming the option and the path;
    `os.access` alone would pass root everywhere. Returns the absolute path."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        where = f" ({e.filename})" if e.filename and e.filename != path else ""
        raise ConfigError(f"{what} {path!r} is not a writable directory: {reason}{where}") from None
    return path


def format_table(rows: List[List[str]], header: List[str]) -> str:
    """A plain left-aligned text table for terminal reports."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", temp_prefix: str = ".tmp-") -> Iterator[Any]:
    """Write to a temp file beside `path`, then rename it over `path`: readers (other workers,
    a resumed run) see no file or the whole file, never part of one, even if this process dies
    mid-write (fsync first, so a crash cannot leave an empty renamed file)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files owner-only; nothing written here is secret
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m{rem % 60:02d}s"


def exit_status(run: Callable[[], None], failures: Tuple[Type[BaseException], ...]) -> int:
    """A command's exit status: 0 when run() returns; 1 with one `error:` line on stderr for a
    failure the user can act on (`failures`); 130 on Ctrl-C."""
    try:
        run()
    except failures as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
