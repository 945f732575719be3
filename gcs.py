"""Google Cloud Storage: the client, retries, the local object cache and listing.

A `gs://bucket/prefix` folder is read like a local class folder (sources.py). Its bytes come
through GCSFiles: a batch is fetched with a bounded thread pool, transient failures are retried
with backoff, and every object can be kept on local disk after its first read. The google-cloud
packages are imported where they are used: CIFAR-10 and STL-10 runs never load them.
"""

import functools
import hashlib
import logging
import os
import random
import re
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple

from config import ConfigError
from utils import atomic_write

logger = logging.getLogger("byol.gcs")

# Transient failures (429, 5xx, dropped or reset connections, timeouts) are retried until
# GCS_RETRY_DEADLINE_S has passed since the first try of a request: a throttling episode of a
# minute, with thousands of requests in flight, must not kill a loader worker. Before try k+1
# the reader sleeps a random time in [0, min(GCS_RETRY_CAP_S, GCS_RETRY_BASE_S * 2**(k-1))]
# ("full jitter"), so that workers throttled at the same moment do not all come back at the same
# moment. The values are module-level so tests can shrink them.
GCS_RETRY_DEADLINE_S = 120.0
GCS_RETRY_BASE_S = 0.1
GCS_RETRY_CAP_S = 10.0
# (connect, read) timeout of one request in seconds: a stalled connection becomes a retry
# instead of a loader worker that hangs forever.
GCS_TIMEOUT_S = (20.0, 60.0)

# Statuses worth another try besides every 5xx (server-side errors): request timeout and rate
# limiting.
_RETRYABLE_STATUSES = frozenset({408, 429})

# Temp files in the cache start with "%t": percent-encoded names never contain "%" followed by
# anything but two upper-case hex digits, so a temp file can never be taken for a cached object.
_CACHE_TMP_PREFIX = "%tmp-"
# File systems cap a file name at 255 bytes; longer encoded components are replaced by a hash.
_CACHE_MAX_COMPONENT = 200

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


class GCSError(OSError):
    """A GCS request that failed for good: not found (404), not allowed (401/403), another
    error that retrying cannot fix, or a transient one still failing at the retry deadline
    (`transient` is then True). The message names the gs:// url; `status` is the HTTP status
    when there was one."""

    def __init__(self, message: str, status: Optional[int] = None, transient: bool = False):
        super().__init__(message)
        self.status, self.transient = status, transient


def parse_gcs_url(url: str) -> Tuple[str, str]:
    """'gs://bucket/some/prefix' -> ('bucket', 'some/prefix/'); the prefix is '' for the whole
    bucket and otherwise ends in '/', so it never matches 'some/prefix2/...'."""
    if not url.startswith("gs://"):
        raise ConfigError(f"{url!r} is not a gs://BUCKET/PREFIX url")
    bucket, _, prefix = url[len("gs://") :].partition("/")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise ConfigError(
            f"{url!r}: {bucket!r} is not a valid bucket name (3-222 characters: lower-case "
            f"letters, digits, '-', '_' and '.', starting and ending with a letter or digit)"
        )
    prefix = prefix.rstrip("/")
    return bucket, prefix + "/" if prefix else ""


def _http_status(error: BaseException) -> Optional[int]:
    """The HTTP status behind a google-api-core error (`code`) or a media error (`response`)."""
    code = getattr(error, "code", None)
    if isinstance(code, int):
        return code
    status = getattr(getattr(error, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _is_transient(error: BaseException) -> bool:
    """Whether trying the same request again may succeed."""
    import http.client

    import requests
    import urllib3
    from google.auth.exceptions import TransportError

    try:  # google-cloud-storage >= 3.0 carries its own resumable-media code
        from google.cloud.storage.exceptions import DataCorruption
    except ImportError:  # 2.x (Determined's default image) raises google-resumable-media's
        from google.resumable_media import DataCorruption

    status = _http_status(error)
    if status is not None:
        return status in _RETRYABLE_STATUSES or 500 <= status < 600
    return isinstance(
        error,
        (
            ConnectionError,  # reset, refused, broken pipe
            TimeoutError,
            requests.ConnectionError,  # includes "Connection aborted" (peer closed, no answer)
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,  # body cut off mid-way
            http.client.HTTPException,
            urllib3.exceptions.ProtocolError,
            urllib3.exceptions.TimeoutError,
            TransportError,  # fetching an access token failed on the network
            DataCorruption,  # checksum mismatch: the bytes were damaged in transit
        ),
    )


def describe_error(error: BaseException) -> str:
    """One line for a failed request."""
    # The client's messages hold the request url and the server's answer; never headers, so
    # no access token ends up in a log.
    return f"{type(error).__name__}: {error}"


def _permanent_error(what: str, error: BaseException, status: Optional[int]) -> GCSError:
    if status == 404:
        return GCSError(f"{what}: not found (404): no such bucket or object", status)
    if status == 403:
        return GCSError(
            f"{what}: permission denied (403): the credentials in use (Application Default "
            f"Credentials) may not read it",
            status,
        )
    if status == 401:
        return GCSError(f"{what}: not authenticated (401): the credentials were rejected", status)
    return GCSError(f"{what}: {describe_error(error)}", status)


# Where retries read the time and wait (anything with monotonic() and sleep()): the time
# module, or a test's clock that moves only when someone waits.
RETRY_CLOCK = time


def call_with_retries(
    what: str,
    call: Callable,
    sleep: Optional[Callable[[float], None]] = None,
    clock: Optional[Callable[[], float]] = None,
    deadline_s: Optional[float] = None,
):
    """call() with transient failures retried until the deadline (see GCS_RETRY_*; `deadline_s`
    instead of GCS_RETRY_DEADLINE_S where a caller cannot wait that long). Every failure that
    escapes is a GCSError naming `what` (a gs:// url): 404, 403 and other permanent errors at
    once, a transient one when the next try would start past the deadline. `sleep` and `clock`
    default to RETRY_CLOCK's."""
    sleep = sleep or RETRY_CLOCK.sleep
    clock = clock or RETRY_CLOCK.monotonic
    deadline = GCS_RETRY_DEADLINE_S if deadline_s is None else deadline_s
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as error:  # sorted into transient / permanent just below
            status = _http_status(error)
            if not _is_transient(error):
                raise _permanent_error(what, error, status) from error
            delay = random.uniform(0, min(GCS_RETRY_CAP_S, GCS_RETRY_BASE_S * 2 ** (attempt - 1)))
            elapsed = clock() - started
            if elapsed + delay > deadline:
                raise GCSError(
                    f"{what}: still failing after {attempt} attempts in {elapsed:.1f} s "
                    f"(retry deadline {deadline:g} s): {describe_error(error)}",
                    status,
                    transient=True,
                ) from error
            logger.debug("%s: %s; try %d in %.2fs", what, describe_error(error), attempt + 1, delay)
            sleep(delay)


def gcs_client(connections: int = 10):
    """A google-cloud-storage client with Application Default Credentials, or anonymous against
    the emulator when STORAGE_EMULATOR_HOST is set (the library does that itself).
    `connections` threads will share it: its HTTP connection pool is sized to match, otherwise
    requests keeps 10 connections and opens and throws away one per extra concurrent read."""
    import requests
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    # Since 3.x the client fetches each bucket's metadata in a background thread, only to label
    # OpenTelemetry spans: an extra request we cannot retry or count, which needs
    # storage.buckets.get besides. The library's own switch turns it off (unless the user set it).
    os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "1")
    try:
        # Reading objects needs no project (only creating buckets does); project=None keeps user
        # credentials without a default project from failing here.
        client = storage.Client(project=None)
    except DefaultCredentialsError:
        raise GCSError(
            "no Google Cloud credentials found: run `gcloud auth application-default login`, "
            "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run on a GCP "
            "machine whose service account may read the bucket"
        ) from None
    session = client._http  # the client's requests session (created here, bound to credentials)
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(10, connections))
    for scheme in ("https://", "http://"):
        # Only replace the stock adapter (an mTLS one, if configured, stays as it is).
        if type(session.get_adapter(scheme)) is requests.adapters.HTTPAdapter:
            session.mount(scheme, adapter)
    return client


def download_object(client, bucket: str, object_name: str) -> bytes:
    """One object's bytes, with retries. retry=None: the library's own retry (up to 120 s, on a
    deadline) would hide failures from ours and stack on top of it."""
    blob = client.bucket(bucket).blob(object_name)
    return call_with_retries(
        f"gs://{bucket}/{object_name}",
        lambda: blob.download_as_bytes(retry=None, timeout=GCS_TIMEOUT_S),
    )


def _list_page(
    client, bucket: str, prefix: str, token: Optional[str], page_size: int = 1000
) -> Tuple[List[str], Optional[str]]:
    iterator = client.list_blobs(
        bucket,
        prefix=prefix or None,
        page_token=token,
        page_size=page_size,
        fields="items(name),nextPageToken",
        retry=None,
        timeout=GCS_TIMEOUT_S,
    )
    page = next(iterator.pages)
    return [blob.name for blob in page], iterator.next_page_token


def list_gcs_objects(
    client, bucket: str, prefix: str, on_page: Optional[Callable[[int], None]] = None
) -> List[str]:
    """Every object name under gs://bucket/prefix, in the bucket's (lexicographic) order. Pages
    are fetched one at a time with retries, so a transient failure in a long listing (ImageNet:
    ~1300 pages) retries that page instead of starting over. on_page(count) reports progress."""
    names: List[str] = []
    token = None
    while True:
        page, token = call_with_retries(
            f"gs://{bucket}/{prefix}", functools.partial(_list_page, client, bucket, prefix, token)
        )
        names.extend(page)
        if on_page is not None:
            on_page(len(names))
        if not token:
            return names


def object_exists(client, bucket: str, object_name: str, deadline_s: float) -> bool:
    """Whether gs://bucket/object_name exists: one metadata request, the object is not read."""
    blob = call_with_retries(
        f"gs://{bucket}/{object_name}",
        lambda: client.bucket(bucket).get_blob(object_name, retry=None, timeout=GCS_TIMEOUT_S),
        deadline_s=deadline_s,
    )
    return blob is not None


def prefix_holds_objects(client, bucket: str, prefix: str, deadline_s: float) -> bool:
    """Whether any object lies under gs://bucket/prefix: one listing request for one name."""
    names, _ = call_with_retries(
        f"gs://{bucket}/{prefix}",
        functools.partial(_list_page, client, bucket, prefix, None, page_size=1),
        deadline_s=deadline_s,
    )
    return bool(names)


def _encode_component(component: str) -> str:
    """One '/'-separated part of an object name as a safe file name (see gcs_cache_path)."""
    if component in ("", ".", ".."):
        # quote() leaves these as they are; "%", "%2E" and "%2E%2E" are spellings quote() never
        # produces itself ('.' is never encoded), so they cannot collide with a real name.
        return {"": "%", ".": "%2E", "..": "%2E%2E"}[component]
    encoded = urllib.parse.quote(component, safe="")
    if len(encoded) > _CACHE_MAX_COMPONENT:
        # "%h" is not quote() output either (it writes upper-case hex digits after '%').
        encoded = "%h" + hashlib.sha256(component.encode("utf-8", "surrogatepass")).hexdigest()
    return encoded


def gcs_cache_path(cache_dir: str, bucket: str, object_name: str) -> str:
    """Where the cached copy of gs://bucket/object_name lives: cache_dir/<bucket>/<name>, each
    '/'-separated component percent-encoded, so that no object name, however hostile, resolves
    outside cache_dir or onto another object's file: '\\', NUL, ':', '%', control and non-ASCII
    characters are encoded (only letters, digits and '_.-~' stay as they are); empty, '.' and
    '..' components get their own encodings; over-long components are hashed. The mapping is
    one-to-one, so two objects never share a file. (GCS may hold both 'a' and 'a/b', which a
    disk cannot hold as a file and a directory: the second one read is then not cached.)"""
    root = os.path.abspath(cache_dir)
    parts = [_encode_component(bucket)] + [_encode_component(c) for c in object_name.split("/")]
    path = os.path.join(root, *parts)
    # Cannot fail given the encoding above; checked anyway since a mistake here would write
    # outside the cache.
    if os.path.commonpath([root, path]) != root or path == root:
        raise ValueError(f"gs://{bucket}/{object_name!r}: cache path {path!r} escapes {root!r}")
    return path


# Guards creating a GCSFiles' per-process client and pool. A forked child gets a fresh lock: a
# copy could have been taken while another thread of the parent held it.
_GCS_INIT_LOCK = threading.Lock()


def _new_gcs_init_lock() -> None:
    global _GCS_INIT_LOCK
    _GCS_INIT_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_gcs_init_lock)


class _GCSProcessState:
    """What a GCSFiles holds in one process: the client (made on first use, so reads that the
    cache answers need no credentials) and the thread pool."""

    def __init__(self, concurrency: int):
        self.pid = os.getpid()
        self.client = None
        self.pool = (
            ThreadPoolExecutor(concurrency, thread_name_prefix="gcs-read")
            if concurrency > 1
            else None
        )
        self.warned_cache = False


class GCSFiles:
    """The store of a FileSource on gs://bucket/prefix: read(name) with names relative to the
    prefix. read_many fetches a batch with up to `concurrency` requests in flight (per process:
    every DataLoader worker has its own pool). With `cache_dir` every object is kept on local
    disk after its first read; a cached object is read from disk with no request. The cache
    assumes objects do not change: clear it if the bucket's content does.

    The DataLoader hands the dataset to worker processes (pickled, or copied by fork), and a
    client's connections cannot be shared across processes: the client and pool are made lazily
    in each process, left out of pickles, and made again when the process id changes."""

    def __init__(
        self, bucket: str, prefix: str = "", cache_dir: Optional[str] = None, concurrency: int = 16
    ):
        self.bucket, self.prefix, self.cache_dir = bucket, prefix, cache_dir
        self.concurrency = max(1, int(concurrency))
        self._state: Optional[_GCSProcessState] = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_state"] = None
        return state

    def _process_state(self) -> _GCSProcessState:
        state = self._state
        if state is None or state.pid != os.getpid():
            with _GCS_INIT_LOCK:
                state = self._state
                if state is None or state.pid != os.getpid():
                    state = self._state = _GCSProcessState(self.concurrency)
        return state

    def client(self):
        state = self._process_state()
        if state.client is None:
            with _GCS_INIT_LOCK:
                if state.client is None:
                    state.client = gcs_client(self.concurrency)
        return state.client

    def url(self, name: str) -> str:
        return f"gs://{self.bucket}/{self.prefix}{name}"

    def read(self, name: str) -> bytes:
        object_name = self.prefix + name
        path = gcs_cache_path(self.cache_dir, self.bucket, object_name) if self.cache_dir else None
        if path is not None:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError:  # not cached yet (or unreadable): fetch it
                pass
        data = download_object(self.client(), self.bucket, object_name)
        if path is not None:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with atomic_write(path, "wb", temp_prefix=_CACHE_TMP_PREFIX) as f:
                    f.write(data)
            except OSError as e:
                # A full or read-only disk slows training down (no cache) but must not stop it.
                state = self._process_state()
                if not state.warned_cache:
                    state.warned_cache = True
                    logger.warning(
                        "cannot write the GCS cache under %s (%s); reading without it",
                        self.cache_dir,
                        e,
                    )
        return data

    def read_many(self, names: Sequence[str]) -> List[object]:
        """The objects' bytes in the order of `names`, fetched concurrently. An object still
        failing at the retry deadline comes back as its GCSError in its place (the dataset
        skips or refuses it as it does a corrupt image); a permanent error is raised."""
        pool = self._process_state().pool
        if pool is None or len(names) <= 1:
            return [self._read_or_transient_error(n) for n in names]
        return list(pool.map(self._read_or_transient_error, names))

    def _read_or_transient_error(self, name: str) -> object:
        try:
            return self.read(name)
        except GCSError as error:
            if not error.transient:
                raise
            return error
