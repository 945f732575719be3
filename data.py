"""Dataset splits, the torch datasets and the epoch sampler, built on the image sources.

Data flow:
  image source (sources.py: CIFAR-10 / STL-10 arrays, an image folder, a gs:// prefix, tar
  shards)
    -> TrainImages: uint8 images + a per-sample random key (no float work in the loader)
    -> augment.TwoViewAugmentation: batched two-view augmentation, on the training device or in
       the loader workers (`augment_on`), with the same code either way.
  Labeled images -> EvalImages (centre crops) -> the linear probe and kNN (probe.py).
"""

import bisect
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision
from PIL import Image

import images as images_module
from augment import TwoViewAugmentation, epoch_permutation, item_keys
from config import ConfigError, DataConfig, check_image_folders
from images import CorruptImageError, crops_or_error
from sources import (
    ArraySource,
    ConcatSource,
    Subset,
    is_shard_set,
    open_folder,
    open_unlabeled,
    run_here,
)

logger = logging.getLogger("byol.data")


# Normalisation statistics per dataset (ImageNet's for folders of natural photographs).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "image_folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


# The torchvision datasets behind dataset_name, downloaded into data.download_dir on first use.
TORCHVISION_DATASETS = {
    "cifar10": torchvision.datasets.CIFAR10,
    "stl10": torchvision.datasets.STL10,
}


# ----------------------------------------------------------------------------------------------
# Dataset choice: which sources make up BYOL training, the labeled split, the test split
# ----------------------------------------------------------------------------------------------


class DatasetSplits(NamedTuple):
    byol_train: object  # what BYOL trains on (labels unused)
    labeled_train: Optional[object]  # labeled images the linear probe trains on; None: no labels
    # Labeled images the probe is scored on, or the images of the validation loss: these test
    # images, or without labels held-out images (loss_holdout).
    test: object
    normalization: Tuple[Sequence[float], Sequence[float]]


def _torchvision_arrays(dataset) -> Tuple[np.ndarray, np.ndarray]:
    data = np.asarray(dataset.data)
    if data.shape[1] == 3:  # STL-10 keeps [N, 3, H, W]
        data = data.transpose(0, 2, 3, 1)
    labels = np.asarray(dataset.targets if hasattr(dataset, "targets") else dataset.labels)
    return np.ascontiguousarray(data), labels


def download_here(open_dataset: Callable[[bool], object]) -> object:
    return open_dataset(True)


def build_splits(
    dataset_name: str,
    data: DataConfig,
    share: Callable = run_here,
    first_on_machine: Callable = download_here,
) -> DatasetSplits:
    """Open the dataset named in the hyperparameters. Fails with a ConfigError naming the path or
    value when the data is missing or malformed. `share(fn)` runs fn once (on the chief) and
    gives every process its result: listing a GCS prefix happens once per run.
    `first_on_machine(open_dataset)` calls open_dataset(download=True) in one process of each
    machine and, after it finished, open_dataset(download=False) in the others: one download
    per machine, never several processes writing the same archive."""
    root = os.path.expanduser(data.download_dir)
    if dataset_name == "cifar10":
        os.makedirs(root, exist_ok=True)
        cifar10 = TORCHVISION_DATASETS["cifar10"]
        train = download(cifar10, root, first_on_machine, train=True)
        test = download(cifar10, root, first_on_machine, train=False)
        train_src = ArraySource(*_torchvision_arrays(train), train.classes)
        test_src = ArraySource(*_torchvision_arrays(test), test.classes)
        return DatasetSplits(train_src, train_src, test_src, NORMALIZATION["cifar10"])
    if dataset_name == "stl10":
        os.makedirs(root, exist_ok=True)
        splits = {
            s: download(TORCHVISION_DATASETS["stl10"], root, first_on_machine, split=s)
            for s in ("train", "unlabeled", "test")
        }
        train_src, unlabeled_src, test_src = (
            ArraySource(*_torchvision_arrays(splits[s]), splits["train"].classes)
            for s in ("train", "unlabeled", "test")
        )
        return DatasetSplits(
            ConcatSource([train_src, unlabeled_src]), train_src, test_src, NORMALIZATION["stl10"]
        )
    if dataset_name == "image_folder":
        check_image_folders(data)
        unlabeled = open_unlabeled(data.unlabeled_dir, data, share) if data.unlabeled_dir else None
        if data.train_dir is None:
            train, held = loss_holdout(unlabeled)
            return DatasetSplits(train, None, held, NORMALIZATION["image_folder"])
        train_src = open_folder(data.train_dir, data.train_blob_list, data, share)
        test_src = open_folder(data.test_dir, data.test_blob_list, data, share)
        check_same_classes(train_src.classes, test_src.classes, data)
        byol_train = ConcatSource([train_src, unlabeled]) if unlabeled else train_src
        return DatasetSplits(byol_train, train_src, test_src, NORMALIZATION["image_folder"])
    raise ConfigError(f"unknown dataset {dataset_name!r}")


# Without labels, validation scores the BYOL loss on fixed views of held-out images, which BYOL
# does not train on: this fraction of the set, at least 1 and at most LOSS_HOLDOUT_IMAGES (the
# mean of 10,000 is stable to about 1% between validations, and on a large set it costs a small
# part of an epoch).
LOSS_HOLDOUT_FRACTION = 0.05
LOSS_HOLDOUT_IMAGES = 10_000


def loss_holdout(source) -> Tuple[object, object]:
    """(training images, held-out images) of a set without labels, so that a searcher or
    checkpoint_policy: best chooses by a loss on images the run never trained on. The same
    images for every trial of a search (no seed): from a folder ones spread evenly over its
    sorted names; from a shard set of several shards its first whole shards (each a random mix
    of the set), so that training keeps reading whole shards (data.epoch_order) and a
    validation reads few."""
    count = min(LOSS_HOLDOUT_IMAGES, max(1, int(round(len(source) * LOSS_HOLDOUT_FRACTION))))
    if is_shard_set(source):
        held_shards = int(np.searchsorted(np.cumsum(source.shard_counts), count)) + 1
        if held_shards < len(source.shard_counts):
            return source.shard_range(held_shards, len(source.shard_counts)), source.shard_range(
                0, held_shards
            )
        held = np.arange(count)  # one shard: its first members
    else:
        held = np.linspace(0, len(source) - 1, count).astype(np.int64)
    return Subset(source, np.setdiff1d(np.arange(len(source)), held)), Subset(source, held)


def check_same_classes(train_classes: List[str], test_classes: List[str], data: DataConfig) -> None:
    """The test images are scored by the classes of the training images: the same, in order."""
    if test_classes != train_classes:
        raise ConfigError(
            f"data.test_dir {data.test_dir!r} has classes {test_classes} but data.train_dir "
            f"{data.train_dir!r} has {train_classes}; they must be the same"
        )


def check_probe_classes(classes: List[str], validate_with_classifier: bool) -> None:
    """The linear probe that validation trains tells at least 2 classes apart."""
    if validate_with_classifier and len(classes) < 2:
        raise ConfigError(
            f"the labeled training images have {len(classes)} class(es) ({classes}); the linear "
            f"probe needs at least 2. Add class folders or set "
            f"hyperparameters.validate_with_classifier=false"
        )


def missing_download(dataset_name: str, download_dir: str) -> List[str]:
    """The files of a torchvision dataset (TORCHVISION_DATASETS) that data.download_dir lacks,
    from the dataset class's own file lists, so nothing is read or downloaded; none missing: a
    run opens it without downloading (torchvision checks the files' checksums then)."""
    dataset_class = TORCHVISION_DATASETS[dataset_name]
    meta = getattr(dataset_class, "meta", None)  # CIFAR-10's class names; STL-10 has none
    names = [name for name, _ in dataset_class.train_list + dataset_class.test_list]
    names += [meta["filename"]] if meta else []
    folder = os.path.join(os.path.expanduser(download_dir), dataset_class.base_folder)
    return [name for name in names if not os.path.isfile(os.path.join(folder, name))]


def download(dataset_class, root: str, first_on_machine: Callable, **kwargs):
    """A torchvision dataset, downloaded into `root` on first use (see build_splits)."""

    def open_dataset(may_download: bool):
        try:
            return dataset_class(root, download=may_download, **kwargs)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad archive a RuntimeError
            raise ConfigError(
                f"could not download {dataset_class.__name__} into data.download_dir={root!r}: "
                f"{e}. Check the network, or put the dataset's archive there yourself"
            ) from None

    return first_on_machine(open_dataset)


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic (fit, held-out) index split of the labeled images, stratified per class so
    every class appears in both parts when it has 2+ images."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for cls in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_held = int(round(len(idx) * fraction))
        n_held = min(max(n_held, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held.extend(idx[:n_held])
        fit.extend(idx[n_held:])
    return np.sort(np.asarray(fit, np.int64)), np.sort(np.asarray(held, np.int64))


# The stream of numpy's seeded generator that picks a label fraction (holdout_split uses the
# seed alone), so the subset does not repeat the held-out part's draws.
LABEL_FRACTION_STREAM = 1


def label_fraction_subset(
    labels: np.ndarray, classes: Sequence[str], fraction: float, seed: int
) -> np.ndarray:
    """Positions of a class-balanced `fraction` of the labeled images `labels` (each class keeps
    round(fraction x its count) images, at least 1), sorted. Deterministic in the seed, and
    nested: for one seed, a smaller fraction's subset lies inside a larger one's. A fraction
    that leaves a class without an image is refused, before any work."""
    rng = np.random.default_rng([seed, LABEL_FRACTION_STREAM])
    counts = np.bincount(labels[labels >= 0])
    present = np.flatnonzero(counts)
    chosen = []
    for cls in present:
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        count = int(np.floor(len(idx) * fraction + 0.5))  # rounded half up
        if count < 1:
            raise ConfigError(
                f"hyperparameters.label_fraction={fraction:g} gives 0 labeled images of class "
                f"{classes[cls]!r} ({fraction:g} x its {len(idx)} images outside the held-out part); every "
                f"class needs at least 1: the smallest fraction these images allow is "
                f"{0.5 / counts[present].min():.4g}"
            )
        chosen.extend(idx[:count])
    return np.sort(np.asarray(chosen, np.int64))


# ----------------------------------------------------------------------------------------------
# torch datasets and the sampler
# ----------------------------------------------------------------------------------------------


class CorruptImageLog:
    """Logs each corrupt image once per run and counts them. The loader workers get copies of
    this object; they share a directory of markers (one empty file per image already logged,
    created atomically), so an image met in every epoch by any worker is logged once."""

    def __init__(self, strict: bool):
        self.strict, self.seen, self.lock = strict, set(), threading.Lock()
        self.markers = tempfile.mkdtemp(prefix="byol-corrupt-images-")
        weakref.finalize(self, shutil.rmtree, self.markers, ignore_errors=True)

    def __getstate__(self):
        return {"strict": self.strict, "markers": self.markers}

    def __setstate__(self, state):
        self.__dict__.update(state, seen=set(), lock=threading.Lock())

    def report(self, error: CorruptImageError) -> None:
        if self.strict:
            raise error
        with self.lock:
            if error.name in self.seen:
                return
            self.seen.add(error.name)
        marker = os.path.join(self.markers, hashlib.sha256(error.name.encode()).hexdigest())
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # another process of this run logged it
            return
        except OSError:  # no marker directory (e.g. removed): log rather than stay silent
            pass
        logger.warning("skipping corrupt image %s", error)


def loader_workers(requested: int, announce: bool = True) -> int:
    """data.num_workers, lowered to the cores this process may use, said once in one line
    (instead of torch's warning at every loader)."""
    cores = len(os.sched_getaffinity(0))
    if requested <= cores:
        return requested
    if announce:
        logger.info(
            "data.num_workers=%d is more than the %d cores here: using %d loader workers",
            requested,
            cores,
            cores,
        )
    return cores


# The batch entries of images the training process decodes (data.decode_on: gpu) that stay in
# host memory: torchvision's decode_jpeg reads the bytes from there, the rest is bookkeeping.
HOST_ONLY = ("jpeg", "jpeg_sizes", "jpeg_rows", "jpeg_boxes", "jpeg_index")


def decodes_on_device(setting: str, device: torch.device, source) -> bool:
    """data.decode_on: whether the training process decodes BYOL's training JPEGs on `device`
    (nvJPEG on a GPU, batched), the loader workers only reading their bytes and headers. cpu:
    never; gpu: yes (on a GPU only); auto: for a shard set on a GPU (ImageNet's layout, where
    decoding is what the loader cores spend their time on)."""
    if setting == "gpu":
        if device.type != "cuda":
            raise ConfigError(
                f"data.decode_on=gpu decodes on the training GPU (nvJPEG), and this trial "
                f"trains on {device.type}: set data.decode_on=auto or cpu"
            )
        if images_module.decode_jpeg is None:
            raise ConfigError(
                "data.decode_on=gpu needs torchvision.io.decode_jpeg, which this torchvision "
                "lacks: set data.decode_on=auto or cpu"
            )
        return True
    on_gpu = device.type == "cuda" and images_module.decode_jpeg is not None
    return setting == "auto" and on_gpu and is_shard_set(source)


class TrainImages(torch.utils.data.Dataset):
    """BYOL training items: {"image": uint8, "key": int64, "corrupt": 0/1}.

    Items are fetched by (index, epoch) pairs from EpochBatchSampler; a batch is loaded through
    `__getitems__` so remote stores can fetch it concurrently. Arrays of the training size ship
    whole ([3, H, W]) and are cropped batched. Other images are cropped here ([2, 3, S, S]), so
    only the crops travel to the device: both views' boxes come from `augment` and the image's
    size in its header, then the image is decoded once, only as far as its two crops need
    (images.EncodedImage.crops). With `augment_in_loader` the collated batch also gets its two
    views here. With `decode_on_device` (data.decode_on: gpu) a JPEG that the device can decode
    (images.device_decodable) ships as its bytes and both boxes instead, for device_decode.py."""

    def __init__(
        self,
        source,
        augment: TwoViewAugmentation,
        seed: int,
        corrupt_log: CorruptImageLog,
        augment_in_loader: bool = False,
        decode_on_device: bool = False,
    ):
        self.source, self.augment, self.seed, self.corrupt_log = source, augment, seed, corrupt_log
        self.crop_in_loader = source.fixed_size is None
        self.augment_in_loader = augment_in_loader
        self.decode_on_device = decode_on_device and self.crop_in_loader

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[Tuple[int, int]]) -> List[Dict[str, torch.Tensor]]:
        indices = [int(i) for i, _ in items]
        keys = item_keys(self.seed, items)
        if not self.crop_in_loader:
            images = self.source.tensor(indices)
            return [
                {"image": images[j], "key": keys[j], "corrupt": torch.tensor(0)}
                for j in range(len(items))
            ]
        images = self.source.load_many(indices)
        boxes = self.view_boxes(keys, images)
        out = []
        for j, (index, image) in enumerate(zip(indices, images)):
            if self.decode_on_device and images_module.device_decodable(image):
                # Its bytes as read and its boxes: collate_for_device joins the batch's bytes.
                item = {"jpeg": image.data, "boxes": boxes[j], "index": index}
                out.append(dict(item, key=keys[j], corrupt=torch.tensor(0)))
                continue
            views = crops_or_error(image, boxes[j], self.augment.size)
            corrupt = isinstance(views, CorruptImageError)
            if corrupt:
                self.corrupt_log.report(views)
                views = self._replacement(index, keys[j : j + 1])
            out.append({"image": views, "key": keys[j], "corrupt": torch.tensor(int(corrupt))})
        return out

    def view_boxes(self, keys: torch.Tensor, images: Sequence[object]) -> torch.Tensor:
        """[B, 2, 4]: both views' crop boxes in each image, from its full-resolution size (an
        image whose header is unreadable gets boxes of a 1 x 1 image, never used)."""
        sides = [
            (1, 1) if isinstance(i, CorruptImageError) else (i.height, i.width) for i in images
        ]
        heights, widths = torch.tensor(sides).T
        views = [self.augment.crop_boxes(keys, view, heights, widths) for view in (0, 1)]
        return torch.stack(views, dim=1)

    def _replacement(self, index: int, key: torch.Tensor) -> torch.Tensor:
        """A corrupt image is replaced by the next decodable one, cropped with the corrupt
        image's key, so batch shapes stay fixed."""
        for step in range(1, len(self.source)):
            candidate = self.source.load_many([(index + step) % len(self.source)])
            boxes = self.view_boxes(key, candidate)[0]
            views = crops_or_error(candidate[0], boxes, self.augment.size)
            if not isinstance(views, CorruptImageError):
                return views
            self.corrupt_log.report(views)
        raise ConfigError("every image of the training set is corrupt")

    def collate(self, items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        if self.decode_on_device:
            return self.collate_for_device(items)
        batch = torch.utils.data.default_collate(items)
        if self.augment_in_loader:
            batch["views"] = self.augment(batch.pop("image"), batch["key"])
        return batch

    def collate_for_device(self, items: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        """A batch of which the rows in jpeg_rows are the bytes of JPEGs (concatenated, their
        sizes in jpeg_sizes) with both views' boxes, to decode on the device, and the rows in
        image_rows the loader's crops, as without it (other formats, corrupt images' stand-ins)."""
        on_device = [j for j, item in enumerate(items) if "jpeg" in item]
        here = [j for j, item in enumerate(items) if "jpeg" not in item]
        jpegs, crops = [items[j] for j in on_device], [items[j]["image"] for j in here]
        size = self.augment.size
        blob = bytearray(b"".join(item["jpeg"] for item in jpegs))  # the one copy of the bytes
        return {
            "key": torch.stack([item["key"] for item in items]),
            "corrupt": torch.stack([item["corrupt"] for item in items]),
            "image": torch.stack(crops) if crops else torch.empty(0, 2, 3, size, size).byte(),
            "image_rows": torch.tensor(here, dtype=torch.int64),
            "jpeg": torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.empty(0).byte(),
            "jpeg_sizes": torch.tensor([len(item["jpeg"]) for item in jpegs], dtype=torch.int64),
            "jpeg_rows": torch.tensor(on_device, dtype=torch.int64),
            "jpeg_boxes": torch.stack([item["boxes"] for item in jpegs])
            if jpegs
            else torch.empty(0, 2, 4),
            "jpeg_index": torch.tensor([item["index"] for item in jpegs], dtype=torch.int64),
        }


# Decoded centre crops that validation keeps in memory, in all (the loader workers each keep
# the share they serve): CIFAR-sized folders stay whole, ImageNet's 224 px crops do not.
EVAL_CACHE_BYTES = 2 << 30


class EvalImages(torch.utils.data.Dataset):
    """Labeled images for the linear probe and kNN: {"image", "label", "split", "index"}.
    Large images are resized (shorter side to size * 8/7) and centre-cropped to `size`.

    Validation reads the same images every time: encoded images are decoded and cropped once
    and kept (as uint8 crops, corrupt ones as None) when all of them fit in EVAL_CACHE_BYTES;
    with persistent loader workers, each worker keeps what it serves."""

    def __init__(
        self, parts: Sequence[Tuple[object, int]], size: int, corrupt_log: CorruptImageLog
    ):
        self.parts, self.size, self.corrupt_log = list(parts), size, corrupt_log
        self.offsets = np.cumsum([0] + [len(src) for src, _ in self.parts]).tolist()
        self.keep_decoded = len(self) * 3 * size * size <= EVAL_CACHE_BYTES
        self.decoded: Dict[int, Optional[torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
        out: List[Dict[str, torch.Tensor]] = [{} for _ in indices]
        by_part: Dict[int, List[int]] = {}
        for j, index in enumerate(indices):
            by_part.setdefault(bisect.bisect_right(self.offsets, index) - 1, []).append(j)
        blank = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        for part, positions in by_part.items():
            source, split = self.parts[part]
            local = [indices[j] - self.offsets[part] for j in positions]
            images = self._crops(source, part, local)
            for j, in_part, image in zip(positions, local, images):
                valid = image is not None
                out[j] = {
                    "image": image if valid else blank,
                    "label": torch.tensor(int(source.labels[in_part])),
                    "split": torch.tensor(split),
                    "index": torch.tensor(indices[j]),
                    "valid": torch.tensor(int(valid)),
                }
        return out

    def _crops(self, source, part: int, local: List[int]) -> List[Optional[torch.Tensor]]:
        """uint8 [3, size, size] crops of a part's images (None where corrupt)."""
        if source.fixed_size == self.size:
            return list(source.tensor(local))
        start = self.offsets[part]
        missing = [i for i in local if start + i not in self.decoded]
        # One load_many per part: a remote store fetches them together.
        fresh = (
            dict(zip(missing, map(self._center_crop, source.load_many(missing)))) if missing else {}
        )
        if self.keep_decoded:
            self.decoded.update((start + i, crop) for i, crop in fresh.items())
        return [fresh[i] if i in fresh else self.decoded[start + i] for i in local]

    def _center_crop(self, image) -> Optional[torch.Tensor]:
        if not isinstance(image, CorruptImageError):
            try:
                return center_crop(image.decode(), self.size)
            except CorruptImageError as error:
                image = error
        self.corrupt_log.report(image)
        return None


def center_crop(image: Image.Image, size: int) -> torch.Tensor:
    short = min(image.size)
    resize_to = size if short == size else int(round(size * 8 / 7)) if short > size else size
    if short != resize_to:
        scale = resize_to / short
        image = image.resize(
            (
                max(resize_to, round(image.width * scale)),
                max(resize_to, round(image.height * scale)),
            ),
            Image.BILINEAR,
        )
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def check_one_batch(num_samples: int, global_batch: int) -> None:
    """An epoch is a whole number of global batches: the training set must hold at least one."""
    if num_samples < global_batch:
        raise ConfigError(
            f"the training set has {num_samples} images, fewer than one global batch "
            f"({global_batch}); lower hyperparameters.global_batch_size"
        )


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled per-slot batches of (index, epoch) pairs, a fresh permutation per epoch seeded
    by (seed, epoch). Each epoch yields `global batches x slots` per-slot batches, so Determined's
    round-robin sharding hands slot r the r-th piece of every global batch: global batch k holds
    the same images whatever the slot count. Every pass over the sampler is the next epoch,
    unless `fixed_epoch` is given: then every pass repeats that epoch (validation views).
    `order(seed, epoch)` gives the epoch's order (see epoch_order); a permutation by default."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        slots: int,
        seed: int,
        fixed_epoch: Optional[int] = None,
        order: Optional[Callable[[int, int], Sequence[int]]] = None,
    ):
        check_one_batch(num_samples, global_batch)
        self.num_samples, self.global_batch, self.slots, self.seed = (
            num_samples,
            global_batch,
            slots,
            seed,
        )
        self.batches_per_epoch = num_samples // global_batch
        # The one place the global batch is split (parse_hparams checks that it splits evenly).
        self.per_slot_batch = global_batch // slots
        self.fixed_epoch = fixed_epoch
        self.order = order or functools.partial(epoch_permutation, count=num_samples)
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch * self.slots

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        if self.fixed_epoch is not None:
            epoch = self.fixed_epoch
        else:
            epoch, self.epoch = self.epoch, self.epoch + 1
        order = self.order(self.seed, epoch)
        per_slot = self.per_slot_batch
        for start in range(0, self.batches_per_epoch * self.global_batch, per_slot):
            yield [(i, epoch) for i in order[start : start + per_slot]]


def fixed_view_batches(num_samples: int, batch: int) -> List[List[Tuple[int, int]]]:
    """Validation's batches of (index, epoch -1) pairs: every image once, in order, the last
    batch short; epoch -1 gives every validation the same views (no training epoch is < 0)."""
    return [
        [(i, -1) for i in range(start, min(start + batch, num_samples))]
        for start in range(0, num_samples, batch)
    ]


def epoch_order(source, global_batch: int) -> Optional[Callable[[int, int], Sequence[int]]]:
    """The sampler's epoch order for `source`: a shard set's keeps each slot on a few whole
    shards (shards.shard_epoch_order); None (a plain permutation) for every other source."""
    if is_shard_set(source):
        return functools.partial(source.epoch_order, global_batch=global_batch)
    return None
