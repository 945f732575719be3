"""Image sources: every kind of place images come from, behind one interface.

The kinds: arrays already decoded (CIFAR-10, STL-10: ArraySource), image files in a local
folder or under a gs:// prefix, listed by a scan, a listing or a blob list (FileSource), and tar
shard sets, local or gs:// (shards.ShardSource). Built on them: several end to end
(ConcatSource), a part of one (Subset), one without its labels (without_labels).

Every source has
  len(source), source.labels (int64, UNLABELED without one) and source.classes: the images with
    their labels;
  source.load_many(indices): their bytes, read together (a remote store reads a batch
    concurrently), as images.EncodedImage with the size from the header and the pixels not yet
    decoded (DecodedImage for arrays);
  where a corrupt image came from: in load_many's result a CorruptImageError takes its place,
    named by its full path (folder/name, gs://bucket/prefix/name, shard:member), which
    source.location(index) also gives;
  source.fixed_size: the side of every image when all have one (arrays, whose
    source.tensor(indices) gives them batched), else None.

open_folder and open_unlabeled open any of them from the path a config names. Below this module:
gcs.py (reading a bucket) and shards.py (shard sets); above it: data.py (splits, datasets and
the sampler).
"""

import bisect
import copy
import functools
import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import gcs
import shards
from config import ConfigError, DataConfig
from images import CorruptImageError, DecodedImage, EncodedImage

logger = logging.getLogger("byol.data")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


UNLABELED = -1

# ----------------------------------------------------------------------------------------------
# The kinds of source
# ----------------------------------------------------------------------------------------------


class ArraySource:
    """Images already decoded in one uint8 array [N, H, W, 3] (CIFAR-10, STL-10)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
        self.images, self.labels, self.classes = images, np.asarray(labels, np.int64), list(classes)
        self.fixed_size = images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def load_many(self, indices: Sequence[int]) -> List[DecodedImage]:
        return [DecodedImage(self.images[i]) for i in indices]

    def location(self, index: int) -> str:
        return f"row {int(index)}"

    def tensor(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self.images[np.asarray(indices)]).permute(0, 3, 1, 2)


class LocalFiles:
    """Reads image bytes from a local directory."""

    def __init__(self, root: str):
        self.root = root

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()

    def read_many(self, names: Sequence[str]) -> List[bytes]:
        return [self.read(n) for n in names]


class FileSource:
    """Encoded images by name in a store (local directory or GCS), labels from class dirs."""

    fixed_size = None

    def __init__(
        self, names: Sequence[str], labels: Sequence[int], classes: Sequence[str], store, where: str
    ):
        self.names, self.labels, self.classes = (
            list(names),
            np.asarray(labels, np.int64),
            list(classes),
        )
        self.store, self.where = store, where

    def __len__(self) -> int:
        return len(self.names)

    def load_many(self, indices: Sequence[int]) -> List[object]:
        """Fetches the batch's bytes together (a remote store reads them concurrently) and reads
        each header; an image whose header is corrupt, or one still unreadable at the retry
        deadline, comes back as a CorruptImageError in its place."""
        blobs = self.store.read_many([self.names[i] for i in indices])
        out: List[object] = []
        for i, data in zip(indices, blobs):
            if isinstance(data, gcs.GCSError):  # still unreadable at the retry deadline
                out.append(CorruptImageError(self.location(i), f"unreadable: {data}"))
                continue
            try:
                out.append(EncodedImage(data, self.location(i)))
            except CorruptImageError as e:
                out.append(e)
        return out

    def location(self, index: int) -> str:
        return f"{self.where.rstrip('/')}/{self.names[index]}"


# ----------------------------------------------------------------------------------------------
# Sources built on sources
# ----------------------------------------------------------------------------------------------


class ConcatSource:
    """Several sources end to end (STL-10 train + unlabeled, a folder + unlabeled images)."""

    def __init__(self, parts: Sequence[object]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).tolist()
        self.labels = np.concatenate([p.labels for p in self.parts])
        self.classes = self.parts[0].classes
        sizes = {p.fixed_size for p in self.parts}
        self.fixed_size = sizes.pop() if len(sizes) == 1 else None

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> Tuple[object, int]:
        part = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[part], index - self.offsets[part]

    def load_many(self, indices: Sequence[int]) -> List[object]:
        """One load_many per part, so a remote part fetches its share of a batch together."""
        located = [self._locate(i) for i in indices]
        out: List[object] = [None] * len(indices)
        for part in {id(p): p for p, _ in located}.values():
            positions = [j for j, (p, _) in enumerate(located) if p is part]
            for j, image in zip(positions, part.load_many([located[j][1] for j in positions])):
                out[j] = image
        return out

    def tensor(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([part.tensor([local])[0] for part, local in map(self._locate, indices)])

    def location(self, index: int) -> str:
        part, local = self._locate(index)
        return part.location(local)


class Subset:
    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.labels = source.labels[self.indices]
        self.classes, self.fixed_size = source.classes, source.fixed_size

    def __len__(self) -> int:
        return len(self.indices)

    def load_many(self, indices: Sequence[int]) -> List[object]:
        return self.source.load_many([int(self.indices[i]) for i in indices])

    def tensor(self, indices: Sequence[int]) -> torch.Tensor:
        return self.source.tensor([int(self.indices[i]) for i in indices])

    def location(self, index: int) -> str:
        return self.source.location(int(self.indices[index]))


def without_labels(source):
    """A copy of `source` whose images all have the label UNLABELED and which has no classes."""
    unlabeled = copy.copy(source)
    unlabeled.labels = np.full(len(source), UNLABELED, np.int64)
    unlabeled.classes = []
    return unlabeled


def is_shard_set(source) -> bool:
    """A shard set (shards.ShardSource), whose whole shards the epoch order and the held-out
    split keep together."""
    return isinstance(source, shards.ShardSource)


def image_names(source, indices: Sequence[int]) -> List[str]:
    """How a file list names images of a source: their path under the folder or shard set, or
    their row in the array of a torchvision dataset's training split (CIFAR-10, STL-10)."""
    if isinstance(source, Subset):
        return image_names(source.source, [int(source.indices[i]) for i in indices])
    names = getattr(source, "names", None)
    if names is None:
        return [f"row {int(i)}" for i in indices]
    return [names[int(i)] for i in indices]


# ----------------------------------------------------------------------------------------------
# Opening a source by the path a config names
# ----------------------------------------------------------------------------------------------


def run_here(fn: Callable):
    return fn()


def open_folder(path: str, blob_list: Optional[str], data: DataConfig, share: Callable):
    """A labeled `<class>/<image>` folder, local or `gs://bucket/prefix`, or a shard set's
    index (*.json, local or gs://) written by make_shards.py."""
    check_blob_list(path, blob_list)
    if shards.is_shard_index(path):
        return shards.open_shards(path, data, share)
    if path.startswith("gs://"):
        return open_gcs_folder(path, blob_list, data, share)
    names, labels, classes = scan_class_folder(path)
    return FileSource(names, labels, classes, LocalFiles(path), path)


def open_unlabeled(path: str, data: DataConfig, share: Callable):
    """data.unlabeled_dir: images in any layout, local or gs://bucket/prefix, or a shard set's
    index. Nothing in it is a label: not its folder names, not a shard set's classes."""
    if shards.is_shard_index(path):
        return without_labels(shards.open_shards(path, data, share))
    if path.startswith("gs://"):
        return open_gcs_folder(path, None, data, share, labeled=False)
    names = scan_unlabeled_folder(path)
    return FileSource(names, [UNLABELED] * len(names), [], LocalFiles(path), path)


def check_blob_list(path: str, blob_list: Optional[str]) -> None:
    """A blob list names the images of a folder; a shard index lists its images itself."""
    if shards.is_shard_index(path) and blob_list is not None:
        raise ConfigError(
            f"{path!r} is a shard index, which lists its images itself; a blob list "
            f"({blob_list!r}) is only for a folder of images: leave it out"
        )


def scan_class_folder(root: str) -> Tuple[List[str], List[int], List[str]]:
    """`root/<class>/<image>` -> (relative names, labels, classes sorted by name)."""
    if not os.path.isdir(root):
        raise ConfigError(f"image folder {root!r} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    names, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    names.append(os.path.relpath(os.path.join(dirpath, f), root))
                    labels.append(label)
    if not names:
        raise ConfigError(
            f"image folder {root!r} holds no images: expected {root}/<class>/<image> files with "
            f"extensions {', '.join(IMAGE_EXTENSIONS)} (images without labels, in any layout: "
            f"data.unlabeled_dir)"
        )
    return names, labels, classes


def scan_unlabeled_folder(root: str) -> List[str]:
    """Every image under `root`, at any depth: folder names are not labels."""
    if not os.path.isdir(root):
        raise ConfigError(f"data.unlabeled_dir {root!r} does not exist or is not a directory")
    names = [
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in sorted(os.walk(root, followlinks=True))
        for f in sorted(files)
        if f.lower().endswith(IMAGE_EXTENSIONS)
    ]
    if not names:
        raise ConfigError(
            f"data.unlabeled_dir {root!r} holds no images: no file under it, at any depth, has "
            f"one of the extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    return names


def verify_local_images(source, limit: int = 100_000) -> None:
    """With data.strict_images, a local folder of at most `limit` images is checked before
    training (PIL's verify: headers and, for PNG, checksums; no full decode), so a corrupt file
    stops the run at once instead of mid-epoch. Remote and larger sources are checked as read."""
    parts = source.parts if isinstance(source, ConcatSource) else [source]
    for part in parts:
        if not isinstance(part, FileSource) or not isinstance(part.store, LocalFiles):
            continue
        if len(part) > limit:
            continue
        for name in part.names:
            path = os.path.join(part.store.root, name)
            try:
                with Image.open(path) as image:
                    image.verify()
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                reason = str(e).split(" <")[0]
                raise CorruptImageError(path, reason) from None


# ----------------------------------------------------------------------------------------------
# Folders under a gs:// prefix: a listing or a blob list
# ----------------------------------------------------------------------------------------------


def class_folder_names(
    object_names: Sequence[str], prefix: str, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> Tuple[List[str], List[int], List[str]]:
    """Full object names -> (names relative to prefix, labels, classes sorted by name), with the
    rules of the local scan_class_folder (torchvision ImageFolder's): the class is the first
    directory under the prefix. Left out: objects outside the prefix, directly under it, in a
    hidden ('.') class directory, or without an image extension (case-insensitive)."""
    extensions = tuple(e.lower() for e in extensions)
    by_class = set()
    for name in object_names:
        if not name.startswith(prefix) or not name.lower().endswith(extensions):
            continue
        cls, slash, rest = name[len(prefix) :].partition("/")
        if slash and cls and rest and not cls.startswith("."):
            by_class.add((cls, rest))
    classes = sorted({cls for cls, _ in by_class})
    index = {cls: i for i, cls in enumerate(classes)}
    ordered = sorted(by_class)  # by class, then by name within it, as the local scan
    return [f"{cls}/{rest}" for cls, rest in ordered], [index[cls] for cls, _ in ordered], classes


def image_object_names(
    object_names: Sequence[str], prefix: str, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> Tuple[List[str], List[int], List[str]]:
    """Full object names -> (names relative to prefix, all UNLABELED, no classes): every image
    under the prefix at any depth, in the local scan_unlabeled_folder's order (by folder, then
    by name in it), so a folder copied to a bucket trains in the same order."""
    extensions = tuple(e.lower() for e in extensions)
    names = sorted(
        (
            name[len(prefix) :]
            for name in object_names
            if name.startswith(prefix) and name.lower().endswith(extensions) and name != prefix
        ),
        key=lambda name: os.path.split(name),
    )
    return names, [UNLABELED] * len(names), []


def _parse_blob_list(data: bytes, where: str) -> List[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"blob list {where} is not UTF-8 text ({e})") from None
    # One object name per line; only line endings are stripped (spaces are legal in names).
    return [line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r")]


def blob_list_object(bucket: str, blob_list: str) -> Tuple[str, str]:
    """(bucket, object name) of a blob list: a gs:// url, or an object of the folder's bucket."""
    if blob_list.startswith("gs://"):
        list_bucket, _, list_name = blob_list[len("gs://") :].partition("/")
        return list_bucket, list_name
    return bucket, blob_list


def find_gcs_images(
    store: gcs.GCSFiles, blob_list: Optional[str], url: str, labeled: bool = True
) -> Tuple[List[str], List[int], List[str]]:
    """(names, labels, classes) of gs://bucket/prefix: `labeled`, its <class>/<image> objects;
    otherwise every image under it, unlabeled. Every failure is a ConfigError naming `url` (an
    unexpected one's traceback is logged), which Startup.share hands from the chief to every
    process."""
    try:
        if blob_list:
            list_bucket, list_name = blob_list_object(store.bucket, blob_list)
            where = f"gs://{list_bucket}/{list_name}"
            object_names = _parse_blob_list(
                gcs.download_object(store.client(), list_bucket, list_name), where
            )
        else:
            object_names = gcs.list_gcs_objects(store.client(), store.bucket, store.prefix)
        find = class_folder_names if labeled else image_object_names
        names, labels, classes = find(object_names, store.prefix)
        if names:
            logger.info("%s: %d images in %d classes", url, len(names), len(classes))
            return names, labels, classes
        layout = "<class>/<image>" if labeled else "<image> (at any depth)"
        rule = f"{url.rstrip('/')}/{layout} objects with extensions {', '.join(IMAGE_EXTENSIONS)}"
        if blob_list:
            first = f", the first is {object_names[0]!r}" if object_names else ""
            raise ConfigError(
                f"blob list {where} (for {url}) names no images under the prefix: it holds "
                f"{len(object_names)} names{first}; expected full object names of {rule}"
            )
        raise ConfigError(
            f"{url} holds no images: found {len(object_names)} objects under it; expected {rule}"
        )
    except ConfigError:
        raise
    except gcs.GCSError as e:
        raise ConfigError(f"cannot open {url}: {e}") from None
    except Exception as e:  # a bug or an unexpected failure: keep its traceback in the chief's log
        logger.exception("opening %s failed", url)
        raise ConfigError(f"cannot open {url}: {gcs.describe_error(e)}") from None


def open_gcs_folder(
    url: str, blob_list: Optional[str], data: DataConfig, share: Callable, labeled: bool = True
) -> FileSource:
    """A labeled gs://bucket/prefix/<class>/<image> folder, or (not `labeled`) every image under
    the prefix. With `blob_list` (an object name in the same bucket, or a gs:// url) the names
    come from that list, else from listing the prefix; either way once, on the chief (`share`),
    with the result handed to every process."""
    bucket, prefix = gcs.parse_gcs_url(url)
    if data.gcs_concurrency < 1:
        raise ConfigError(
            f"data.gcs_concurrency={data.gcs_concurrency} must be at least 1 (parallel object "
            f"reads per loader process)"
        )
    store = gcs.GCSFiles(bucket, prefix, data.cache_dir, data.gcs_concurrency)
    names, labels, classes = share(
        functools.partial(find_gcs_images, store, blob_list, url, labeled)
    )
    return FileSource(names, labels, classes, store, url)
