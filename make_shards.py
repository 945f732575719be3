#!/usr/bin/env python3
"""Write a training set as tar shards plus an index, for data.train_dir / data.test_dir.

    python make_shards.py SOURCE DEST [--blob-list LIST] [--shard-size-mb 256] [--seed 0]
        [--max-side N]

SOURCE is a `<class>/<image>` folder: local, or gs://BUCKET/PREFIX (listed, or named by a blob
list from generate_blob_list.py). DEST is a local folder or a gs://BUCKET/PREFIX; it receives
shard-00000.tar, shard-00001.tar, ... (plain tar files; members named `<class>/<image>`, so `tar`
and the webdataset library read them), a small shard-NNNNN.json beside each (its members), and
DEST/index.json last: the value for data.train_dir. Images go into the shards in a seeded random
order, so every shard mixes the classes. With --max-side N, an image whose longer side exceeds N
is stored re-encoded (JPEG, quality 90, longer side N, under its own name whatever its
extension): smaller shards, and less to decode for each training crop; the others, and files
that do not decode (which training skips), are stored as they are, as is every image without it.

Each shard appears only when complete: written under a temp name and renamed (local), or
uploaded under its final name once written (GCS); its .json follows it. Run the same command
again after an interruption: complete shards are kept, the rest is written.

Credentials for gs://: Application Default Credentials (or the emulator at STORAGE_EMULATOR_HOST).
Exit status: 0 done, 1 the source or destination failed, 2 bad arguments.
"""

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

import gcs
import shards
import sources
from config import ConfigError
from images import CorruptImageError, EncodedImage
from utils import atomic_write, exit_status, format_duration

INDEX_NAME = "index.json"
# Images read at once per shard being written (concurrently from GCS).
READ_BATCH = 64
# JPEG quality of the images --max-side re-encodes (PIL's scale, 1-95): about what ImageNet's
# own JPEGs use.
REENCODE_QUALITY = 90


class Failure(Exception):
    """A mistake or failure to report as one line on stderr."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.tar"


def members_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".json"


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def positive_mb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of megabytes")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="<class>/<image> folder: a local path or gs://BUCKET/PREFIX")
    parser.add_argument("dest", help="where shards and index.json go: a local folder or gs://...")
    parser.add_argument(
        "--blob-list",
        help="for a gs:// SOURCE: its blob list (object in the bucket, or gs:// url) instead of "
        "listing the prefix",
    )
    parser.add_argument(
        "--shard-size-mb",
        type=positive_mb,
        default=256.0,
        help="a shard is closed once it holds this many MB (default 256)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the image order (default 0)")
    parser.add_argument(
        "--concurrency", type=positive_int, default=16, help="parallel reads from a gs:// SOURCE"
    )
    parser.add_argument(
        "--max-side",
        type=positive_int,
        help=f"re-encode images whose longer side exceeds this many pixels (resized to it, JPEG "
        f"quality {REENCODE_QUALITY}); default: every image as it is",
    )
    return parser


def bounded(content: bytes, name: str, max_side: Optional[int]) -> bytes:
    """The image's bytes as the shard stores them: re-encoded as a JPEG with its longer side
    resized (Lanczos) to max_side when it is longer, else as they are (also when the image does
    not decode: training skips it, logged with its name, as any corrupt image)."""
    if max_side is None:
        return content
    try:
        image = EncodedImage(content, name)
        if max(image.width, image.height) <= max_side:
            return content
        pixels = image.decode()
    except CorruptImageError:
        return content
    scale = max_side / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    out = io.BytesIO()
    pixels.resize(size, Image.LANCZOS).save(out, format="JPEG", quality=REENCODE_QUALITY)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# Where images come from and where shards go
# ----------------------------------------------------------------------------------------------


def open_source(args: argparse.Namespace) -> Tuple[List[str], List[int], List[str], object]:
    """(names, labels, classes, store with read_many) of SOURCE, with sources.py's rules."""
    if not args.source.startswith("gs://"):
        if args.blob_list:
            raise Failure(f"--blob-list is for a gs:// SOURCE; {args.source!r} is a local folder")
        names, labels, classes = sources.scan_class_folder(args.source)
        return names, labels, classes, sources.LocalFiles(args.source)
    bucket, prefix = gcs.parse_gcs_url(args.source)
    store = gcs.GCSFiles(bucket, prefix, None, args.concurrency)
    try:
        return (*sources.find_gcs_images(store, args.blob_list, args.source), store)
    except ConfigError as e:
        raise Failure(str(e)) from None


class LocalDest:
    def __init__(self, folder: str):
        self.folder = folder
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise Failure(f"cannot create DEST {folder!r}: {e.strerror or e}") from None

    def url(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def read(self, name: str) -> Optional[bytes]:
        try:
            with open(self.url(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put_file(self, name: str, path: str) -> None:
        os.replace(path, self.url(name))

    def put_bytes(self, name: str, content: bytes) -> None:
        with atomic_write(self.url(name), "wb", temp_prefix=".partial-") as f:
            f.write(content)

    def temp_dir(self) -> str:
        """Shards are written here, then renamed: the same file system."""
        return self.folder


class GCSDest:
    def __init__(self, url: str):
        self.bucket_name, self.prefix = gcs.parse_gcs_url(url)
        self.client = gcs.gcs_client()
        self.bucket = self.client.bucket(self.bucket_name)

    def url(self, name: str) -> str:
        return f"gs://{self.bucket_name}/{self.prefix}{name}"

    def read(self, name: str) -> Optional[bytes]:
        try:
            return gcs.download_object(self.client, self.bucket_name, self.prefix + name)
        except gcs.GCSError as e:
            if e.status == 404:
                return None
            raise

    def put_file(self, name: str, path: str) -> None:
        """The object appears when the upload completes; uploading again is harmless, so a
        failed upload is retried."""
        blob = self.bucket.blob(self.prefix + name)
        gcs.call_with_retries(
            self.url(name),
            lambda: blob.upload_from_filename(path, retry=None, timeout=gcs.GCS_TIMEOUT_S),
        )
        os.unlink(path)

    def put_bytes(self, name: str, content: bytes) -> None:
        blob = self.bucket.blob(self.prefix + name)
        gcs.call_with_retries(
            self.url(name),
            lambda: blob.upload_from_string(content, retry=None, timeout=gcs.GCS_TIMEOUT_S),
        )

    def temp_dir(self) -> Optional[str]:
        return None  # the system's temp folder


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def write_shard(
    path: str,
    order: Sequence[int],
    names,
    labels,
    store,
    target_bytes: int,
    max_side: Optional[int] = None,
) -> Tuple[int, dict]:
    """Adds images of `order`, from the first, to a tar at `path` until it holds target_bytes
    (at least one image), each `bounded` by max_side. Returns how many it took and the shard's
    index entry, with the data offsets as tarfile reads them back from the finished file."""
    taken = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        while taken < len(order) and (taken == 0 or tar.offset < target_bytes):
            batch = order[taken : taken + READ_BATCH]
            for i, content in zip(batch, store.read_many([names[i] for i in batch])):
                if isinstance(content, gcs.GCSError):  # still failing at the retry deadline
                    raise Failure(str(content))
                content = bounded(content, names[i], max_side)
                info = tarfile.TarInfo(names[i])
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content))
                taken += 1
                if tar.offset >= target_bytes:
                    break
    with tarfile.open(path, "r") as tar:
        written = tar.getmembers()
    expected = [names[i] for i in order[:taken]]
    if [m.name for m in written] != expected:  # tarfile must read back what it wrote
        raise Failure(f"{path}: the tar read back does not hold the images written")
    entry = {
        "size": os.path.getsize(path),
        "members": [
            [m.name, m.offset_data, m.size, int(labels[i])] for m, i in zip(written, order[:taken])
        ],
    }
    return taken, entry


def run(args: argparse.Namespace) -> None:
    try:
        dest = GCSDest(args.dest) if args.dest.startswith("gs://") else LocalDest(args.dest)
        names, labels, classes, store = open_source(args)
    except (ConfigError, gcs.GCSError) as e:
        raise Failure(str(e)) from None
    order = np.random.default_rng(args.seed).permutation(len(names)).tolist()
    target = int(args.shard_size_mb * 1e6)
    print(f"{len(names):,} images in {len(classes)} classes from {args.source}", file=sys.stderr)

    entries: List[dict] = []
    done, started, written_bytes = 0, time.monotonic(), 0
    while done < len(order):
        name = shard_name(len(entries))
        kept = dest.read(members_name(name))
        if kept is not None:  # written by an earlier run: its .json comes after the shard
            entry = json.loads(kept)
            planned = [names[i] for i in order[done : done + len(entry["members"])]]
            if [m[0] for m in entry["members"]] != planned:
                raise Failure(
                    f"{dest.url(name)} holds other images than this run would put there (the "
                    f"source, --seed or --shard-size-mb changed): write to an empty DEST"
                )
            if entry.get("max_side") != args.max_side:
                raise Failure(
                    f"{dest.url(name)} was written with --max-side {entry.get('max_side')}, this "
                    f"run has {args.max_side}: write to an empty DEST"
                )
            print(f"{name}: complete from an earlier run, kept", file=sys.stderr)
        else:
            fd, path = tempfile.mkstemp(prefix=".partial-", suffix=".tar", dir=dest.temp_dir())
            os.close(fd)
            try:
                taken, entry = write_shard(
                    path, order[done:], names, labels, store, target, args.max_side
                )
                entry["name"] = name
                if args.max_side is not None:
                    entry["max_side"] = args.max_side
                dest.put_file(name, path)
            finally:
                if os.path.exists(path):
                    os.unlink(path)
            dest.put_bytes(members_name(name), json.dumps(entry).encode())
            written_bytes += entry["size"]
            elapsed = time.monotonic() - started
            remaining = len(order) - done - taken
            rate = (done + taken) / elapsed  # images/s including the kept ones: a rough ETA
            print(
                f"{name}: {taken:,} images, {entry['size'] / 1e6:.1f} MB; "
                f"{done + taken:,}/{len(order):,} images, {written_bytes / 1e6 / elapsed:.1f} MB/s, "
                f"about {format_duration(remaining / rate)} left",
                file=sys.stderr,
                flush=True,
            )
        entry["name"] = name
        entries.append(entry)
        done += len(entry["members"])
    index = {"format": shards.INDEX_FORMAT, "classes": classes, "shards": entries}
    dest.put_bytes(INDEX_NAME, json.dumps(index).encode())
    print(
        f"{len(order):,} images in {len(entries)} shards -> {dest.url(INDEX_NAME)} "
        f"(set data.train_dir or data.test_dir to it)"
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # exits with 2 on bad arguments
    # A GCSError: writing DEST failed for good.
    return exit_status(lambda: run(args), (Failure, gcs.GCSError))


if __name__ == "__main__":
    sys.exit(main())
