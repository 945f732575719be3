"""Training images read from tar shards (written by make_shards.py), local or on GCS.

A shard set is a folder (or gs:// prefix) of plain tar files plus an index (JSON) naming each
shard, its size, and each member's data offset, length and label. A trial given the index as
data.train_dir or data.test_dir reads whole shards, one request each (through gcs.py's retries
and, with data.cache_dir, its local cache), and cuts the images out of them by offset: a
request fetches a few hundred megabytes, never one image.

The epoch order (shard_epoch_order) is what makes whole-shard reads pay off: each training slot
reads a contiguous run of the epoch's shuffled shards instead of a random image of any shard.
"""

import collections
import copy
import fcntl
import functools
import json
import logging
import math
import os
import threading
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

import gcs
from augment import epoch_permutation, sample_keys
from config import ConfigError, DataConfig
from images import CorruptImageError, EncodedImage

logger = logging.getLogger("byol.shards")

INDEX_FORMAT = "byol-tar-shards/1"

# Lanes of the epoch order: global batch k is cut into LANES chunks, chunk j always drawn from
# lane j, and lane j is a contiguous run of the epoch's shuffled shards. Determined hands slot r
# the r-th piece of every global batch, so with up to SHARD_LANES slots (dividing it) each slot
# reads only its own lanes' shards. More slots than lanes share lanes: each reads its lane's
# shards whole, for a part of their images (more bytes fetched, the same order). The lane
# count is gcd(SHARD_LANES, global batch), so the order never depends on the slot count.
SHARD_LANES = 64
# Images are shuffled within blocks of about SHARD_WINDOW shards of a lane. The trade-off: a
# wider window mixes images from more shards into each batch (shards are written in a shuffled
# order, so even one shard mixes the classes), but keeps more shards live per reader (memory
# without data.cache_dir, open files with it). 4 shards of 256 MB: 1 GB per lane.
SHARD_WINDOW = 4
# Shards a process keeps in memory when there is no data.cache_dir: a lane's block (about
# SHARD_WINDOW shards, plus the partial ones at its ends) and the next block's first shards.
# Shards dropped are fetched again when needed: a process reading many lanes (few slots, large
# global batch), or reading in a random order, should have data.cache_dir.
SHARDS_IN_MEMORY = 2 * SHARD_WINDOW


class MissingShardError(RuntimeError):
    """A shard the index names is not there (or not the size the index says): the shard set is
    incomplete or was rewritten after its index. Training stops with the shard's name."""


def is_shard_index(path: Optional[str]) -> bool:
    """data.train_dir / data.test_dir name a shard set by its index file (*.json)."""
    return path is not None and path.lower().endswith(".json")


# ----------------------------------------------------------------------------------------------
# The epoch order
# ----------------------------------------------------------------------------------------------


def _block_permutation(seed: int, epoch: int, stream: int, count: int) -> np.ndarray:
    """A seeded permutation of `count`, independent for each stream (lane and block).
    Streams use negative sample indices, which no image has (-1 is epoch_permutation's)."""
    key = int(sample_keys(seed, epoch, torch.tensor([-2 - stream]))[0]) & 0x7FFFFFFFFFFFFFFF
    return np.random.default_rng(key).permutation(count)


def shard_epoch_order(
    seed: int,
    epoch: int,
    shard_counts: Sequence[int],
    global_batch: int,
    lanes: int = SHARD_LANES,
    window: int = SHARD_WINDOW,
) -> List[int]:
    """The epoch's image order over a shard set (images numbered shard by shard), a pure
    function of (seed, epoch) and the shard layout: the first (images // global_batch) global
    batches of it are the epoch.

    The shards are permuted (seeded by seed, epoch); their images, in that order, are cut into
    `lanes` equal runs, one per lane; each run is shuffled within blocks of about `window`
    shards; global batch k takes chunk k of every lane, lane 0 first. A lane's run spans a few
    whole shards and shares at most one shard with each neighbouring lane; the images left over
    (fewer than one global batch) are the epoch's last shards', a different few each epoch."""
    counts = np.asarray(shard_counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    total = int(counts.sum())
    batches = total // global_batch
    lanes = math.gcd(lanes, global_batch)
    chunk = global_batch // lanes
    per_lane = batches * chunk
    shard_order = epoch_permutation(seed, epoch, len(counts))
    stream = np.concatenate([np.arange(starts[s], starts[s] + counts[s]) for s in shard_order])
    runs = stream[: lanes * per_lane].reshape(lanes, per_lane)
    block = max(1, int(round(window * total / len(counts))))
    blocks_per_lane = -(-per_lane // block)
    for lane in range(lanes):
        for b, start in enumerate(range(0, per_lane, block)):
            part = runs[lane, start : start + block]
            runs[lane, start : start + block] = part[
                _block_permutation(seed, epoch, lane * blocks_per_lane + b, len(part))
            ]
    return runs.reshape(lanes, batches, chunk).transpose(1, 0, 2).reshape(-1).tolist()


# ----------------------------------------------------------------------------------------------
# Shard stores: member bytes by (shard, offset, length)
# ----------------------------------------------------------------------------------------------


class LocalShards:
    """Shards in a local folder; members are read by offset, no shard is loaded whole."""

    def __init__(self, root: str):
        self.root = root

    def where(self, shard: str) -> str:
        return os.path.join(self.root, shard)

    def check(self, shards: Sequence[str], sizes: Sequence[int]) -> None:
        """Every shard there with its indexed size (a stat each), before training starts."""
        for shard, size in zip(shards, sizes):
            self._check_size(shard, size)

    def _check_size(self, shard: str, size: int) -> None:
        try:
            found = os.path.getsize(self.where(shard))
        except OSError:
            raise MissingShardError(f"shard {self.where(shard)} is missing") from None
        if found != size:
            raise MissingShardError(
                f"shard {self.where(shard)} is {found} bytes but the index says {size}: it was "
                f"rewritten or cut short after the index was written"
            )

    def fetch_many(self, shards: Sequence[str]) -> Dict[str, object]:
        """Nothing to fetch: local shards are read in place."""
        return {}

    def read_members(self, shard: str, size: int, ranges: Sequence[tuple]) -> List[object]:
        try:
            fd = os.open(self.where(shard), os.O_RDONLY)
        except OSError:
            raise MissingShardError(f"shard {self.where(shard)} is missing") from None
        try:
            if os.fstat(fd).st_size != size:
                self._check_size(shard, size)
            return [os.pread(fd, length, offset) for offset, length in ranges]
        finally:
            os.close(fd)


class GCSShards:
    """Shards under gs://bucket/prefix. A shard is fetched whole, in one request with gcs.py's
    deadline retries, the first time a batch needs it; the shards one batch needs are fetched
    concurrently (data.gcs_concurrency at a time).

    With data.cache_dir the shard lands on local disk (the GCSFiles cache) and members are read
    from there by offset; a lock file per shard makes the loader processes of a machine fetch it
    once between them. Without a cache each process keeps up to SHARDS_IN_MEMORY shards in
    memory, and each loader worker fetches its own."""

    def __init__(self, bucket: str, prefix: str, cache_dir: Optional[str], concurrency: int):
        self.files = gcs.GCSFiles(bucket, prefix, cache_dir, concurrency)
        self._memory: Optional[collections.OrderedDict] = None
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_memory"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def where(self, shard: str) -> str:
        return self.files.url(shard)

    def _cache_path(self, shard: str) -> Optional[str]:
        if not self.files.cache_dir:
            return None
        return gcs.gcs_cache_path(
            self.files.cache_dir, self.files.bucket, self.files.prefix + shard
        )

    def _fetch(self, shard: str) -> object:
        """The shard's bytes, or None when it is (now) in the disk cache, or its GCSError when
        still failing at the retry deadline."""
        path = self._cache_path(shard)
        if path is None:
            return self._download(shard)
        # "%lock-" is no percent-encoding of a name, so no object is ever cached at that path.
        lock_path = os.path.join(os.path.dirname(path), "%lock-" + os.path.basename(path))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            lock = open(lock_path, "a")
        except OSError:  # no usable cache: GCSFiles.read warns once and reads without it
            return self._download(shard)
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be fetching it right now
            try:
                if os.path.exists(path):
                    return None
                return self._download(shard)  # GCSFiles.read writes the cache atomically
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _download(self, shard: str) -> object:
        try:
            return self.files.read(shard)
        except gcs.GCSError as error:
            if error.status == 404:
                raise MissingShardError(f"shard {self.where(shard)} is missing (404)") from None
            if not error.transient:
                raise
            return error

    def fetch_many(self, shards: Sequence[str]) -> Dict[str, object]:
        """Makes the shards readable: in memory or in the disk cache. Returns the ones that
        stay unreadable (shard -> GCSError)."""
        with self._lock:
            if self._memory is None:
                self._memory = collections.OrderedDict()
            needed = [s for s in shards if s not in self._memory]
            for s in shards:
                if s in self._memory:
                    self._memory.move_to_end(s)
        path_of = {s: self._cache_path(s) for s in needed}
        needed = [s for s in needed if path_of[s] is None or not os.path.exists(path_of[s])]
        pool = self.files._process_state().pool
        fetched = (
            list(pool.map(self._fetch, needed))
            if pool and len(needed) > 1
            else [self._fetch(s) for s in needed]
        )
        failed = {}
        with self._lock:
            for shard, data in zip(needed, fetched):
                if isinstance(data, gcs.GCSError):
                    failed[shard] = data
                elif data is not None and not (path_of[shard] and os.path.exists(path_of[shard])):
                    self._memory[shard] = data  # no cache, or the cache could not be written
            while len(self._memory) > max(SHARDS_IN_MEMORY, len(shards)):
                self._memory.popitem(last=False)
        return failed

    def read_members(self, shard: str, size: int, ranges: Sequence[tuple]) -> List[object]:
        with self._lock:
            data = self._memory.get(shard) if self._memory is not None else None
        if data is None:
            path = self._cache_path(shard)
            if path is not None and os.path.exists(path):
                return LocalShards(os.path.dirname(path)).read_members(
                    os.path.basename(path), size, ranges
                )
            data = self._download(shard)  # evicted meanwhile by another thread's batch
            if isinstance(data, gcs.GCSError):
                return [data] * len(ranges)
        if len(data) != size:
            raise MissingShardError(
                f"shard {self.where(shard)} is {len(data)} bytes but the index says {size}: it "
                f"was rewritten after the index was written"
            )
        return [data[offset : offset + length] for offset, length in ranges]


# ----------------------------------------------------------------------------------------------
# The image source
# ----------------------------------------------------------------------------------------------


class ShardSource:
    """A shard set as an image source (see sources.FileSource): images numbered shard by shard,
    load_many fetches the shards a batch touches and reads the headers of the members it asks
    for."""

    fixed_size = None

    def __init__(self, index: dict, store, where: str):
        self.store, self.where = store, where
        self.classes = list(index["classes"])
        self.shard_names = [s["name"] for s in index["shards"]]
        self.shard_sizes = [int(s["size"]) for s in index["shards"]]
        self.shard_counts = [len(s["members"]) for s in index["shards"]]
        members = [m for s in index["shards"] for m in s["members"]]
        self.names = [m[0] for m in members]
        self.offsets = np.asarray([m[1] for m in members], np.int64)
        self.lengths = np.asarray([m[2] for m in members], np.int64)
        self.labels = np.asarray([m[3] for m in members], np.int64)
        self.shard_of = np.repeat(np.arange(len(self.shard_names)), self.shard_counts)

    def __len__(self) -> int:
        return len(self.names)

    def shard_range(self, start: int, stop: int) -> "ShardSource":
        """Shards [start, stop) as a shard set of their own, their members numbered from 0: a
        part of the set that keeps whole shards (and so its shard-by-shard epoch order)."""
        first, last = (sum(self.shard_counts[:i]) for i in (start, stop))
        part = copy.copy(self)
        part.shard_names = self.shard_names[start:stop]
        part.shard_sizes = self.shard_sizes[start:stop]
        part.shard_counts = self.shard_counts[start:stop]
        for name in ("names", "offsets", "lengths", "labels"):
            setattr(part, name, getattr(self, name)[first:last])
        part.shard_of = np.repeat(np.arange(len(part.shard_names)), part.shard_counts)
        return part

    def epoch_order(self, seed: int, epoch: int, global_batch: int) -> List[int]:
        return shard_epoch_order(seed, epoch, self.shard_counts, global_batch)

    def location(self, index: int) -> str:
        return f"{self.store.where(self.shard_names[self.shard_of[index]])}:{self.names[index]}"

    def load_many(self, indices: Sequence[int]) -> List[object]:
        """Images (images.EncodedImage, header read) in the order of `indices`; a member whose
        header is corrupt, or whose shard is still unreadable at the retry deadline, comes back
        as a CorruptImageError in its place."""
        by_shard: Dict[int, List[int]] = collections.defaultdict(list)
        for j, index in enumerate(indices):
            by_shard[int(self.shard_of[index])].append(j)
        out: List[object] = [None] * len(indices)
        touched = list(by_shard)
        # A few shards at a time, so that a batch spread over many shards (one process reading
        # many lanes, or a random order) holds at most SHARDS_IN_MEMORY of them.
        for start in range(0, len(touched), SHARDS_IN_MEMORY):
            group = touched[start : start + SHARDS_IN_MEMORY]
            failed = self.store.fetch_many([self.shard_names[s] for s in group])
            for shard in group:
                self._cut(shard, by_shard[shard], indices, failed, out)
        return out

    def _cut(self, shard: int, positions, indices, failed, out: List[object]) -> None:
        """Cuts the members at `positions` of the batch out of one fetched shard into `out`."""

        name = self.shard_names[shard]
        if name in failed:
            for j in positions:
                out[j] = CorruptImageError(self.location(indices[j]), f"unreadable: {failed[name]}")
            return
        ranges = [(int(self.offsets[indices[j]]), int(self.lengths[indices[j]])) for j in positions]
        for j, blob in zip(
            positions, self.store.read_members(name, self.shard_sizes[shard], ranges)
        ):
            if isinstance(blob, gcs.GCSError):
                out[j] = CorruptImageError(self.location(indices[j]), f"unreadable: {blob}")
                continue
            try:
                out[j] = EncodedImage(blob, self.location(indices[j]))
            except CorruptImageError as e:
                out[j] = e


def parse_index(raw: bytes, where: str) -> dict:
    """The index's JSON, checked enough that a wrong file fails here with one line, not in a
    loader worker."""
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"shard index {where} is not JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ConfigError(
            f"{where} is not a shard index written by make_shards.py (expected "
            f'"format": "{INDEX_FORMAT}")'
        )
    if not any(s["members"] for s in index["shards"]):
        raise ConfigError(f"shard index {where} names no images")
    return index


def _read_gcs_index(store: gcs.GCSFiles, name: str, url: str) -> dict:
    """The index of a gs:// shard set (read on the chief only, see open_shards)."""
    try:
        index = parse_index(store.read(name), url)
    except gcs.GCSError as e:
        raise ConfigError(f"cannot open shard index {url}: {e}") from None
    count = sum(len(s["members"]) for s in index["shards"])
    logger.info("%s: %d images in %d shards", url, count, len(index["shards"]))
    return index


def open_shards(path: str, data: DataConfig, share: Callable) -> ShardSource:
    """The shard set whose index is at `path` (local, or gs://bucket/prefix/index.json); its
    shards are named relative to the index's folder. A gs:// index is read once, on the chief."""
    if not path.startswith("gs://"):
        try:
            with open(path, "rb") as f:
                index = parse_index(f.read(), path)
        except OSError as e:
            raise ConfigError(f"cannot read shard index {path!r}: {e.strerror or e}") from None
        store = LocalShards(os.path.dirname(os.path.abspath(path)))
        source = ShardSource(index, store, path)
        store.check(source.shard_names, source.shard_sizes)
        return source
    bucket, object_name = gcs.parse_gcs_url(path)
    object_name = object_name.rstrip("/")
    folder, _, name = object_name.rpartition("/")
    prefix = folder + "/" if folder else ""
    if data.gcs_concurrency < 1:
        raise ConfigError(
            f"data.gcs_concurrency={data.gcs_concurrency} must be at least 1 (parallel shard "
            f"reads per loader process)"
        )
    store = GCSShards(bucket, prefix, data.cache_dir, data.gcs_concurrency)
    index = share(functools.partial(_read_gcs_index, store.files, name, path))
    return ShardSource(index, store, path)
