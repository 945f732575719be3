"""Linear evaluation of a frozen BYOL backbone, as evaluate_result.py runs it.

Protocol (BYOL paper, Section 4.1 and Appendix C.1): the online backbone is frozen and runs in
eval mode (BatchNorm uses its running statistics); linear classifiers on its pooled features are
trained with SGD, Nesterov momentum 0.9 and a cosine LR decay, one per learning rate of a small
sweep, all on the same forward passes. Each epoch sees a random-resized crop with a random
horizontal flip of every labeled training image. The learning rate is chosen on a held-out part
of the labeled training split; the test accuracy of that classifier is the result.
--no-augment trains the classifiers on features extracted once from centre crops instead: far
faster (one pass over the images instead of one per epoch), but not the paper's protocol.

Features are standardised with the mean/std of the fit split's centre-crop features (an affine
map, so the classifier stays linear in the backbone features) exactly as the in-training probe
does; held-out and test images are always scored on centre crops. Beside it, the kNN accuracy of
the test images on the same centre-crop features, as validation computes it (probe.knn_accuracy).
"""

import logging
import math
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

import checkpoint
import data
from augment import (
    CROP_ATTEMPTS,
    crop_resize_batch,
    epoch_permutation,
    item_keys,
    sample_crop_boxes,
    uniforms,
)
from config import ConfigError, HParams, parse_data_config, parse_run_config
from device import Normalize, autocast, autocast_dtype, batch_loader, resolve, uses_channels_last
from images import crops_or_error
from probe import (
    SPLIT_FIT,
    SPLIT_HOLDOUT,
    SPLIT_TEST,
    LinearHeads,
    knn_accuracy,
    labeled_parts,
    score_heads,
    standardization,
    standardize,
    train_heads_on_features,
)
from utils import format_duration

logger = logging.getLogger("byol.evaluate")

# Stream of the counter-based random numbers (uniforms) used for the evaluation crops;
# BYOL's two training views use streams 0 and 1.
AUGMENT_STREAM = 2


# ------------------------------------------------------------------------------------------
# Features of the frozen backbone
# ------------------------------------------------------------------------------------------


class FrozenBackbone:
    """uint8 (or 0-255 float) image batches -> float32 pooled features, without gradients,
    through the trial's own input pipeline (Normalize, autocast)."""

    def __init__(
        self, backbone: torch.nn.Module, name: str, mean, std, dev: torch.device, autocast_dtype
    ):
        self.device = dev
        self.backbone = backbone.to(dev)
        channels_last = uses_channels_last(dev, name)
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.normalize = Normalize(mean, std, dev, channels_last)
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.autocast_dtype):
            return self.backbone(self.normalize(images)).float()


class SplitFeatures(NamedTuple):
    """Centre-crop features of one split, corrupt images left out."""

    features: torch.Tensor  # [N, D] on the CPU, as the backbone gives them (not standardised)
    labels: torch.Tensor  # [N]
    images: torch.Tensor  # [N]: each row's index in data.EvalImages(parts, ...), to show it


def knn_bank(features: Dict[int, SplitFeatures]) -> SplitFeatures:
    """The kNN's labelled training images: the fit split, then the held-out split, as
    validation's kNN takes them (probe.probe_metrics). The bank of the evaluation's kNN accuracy
    and of the neighbour pictures (pictures.py)."""
    parts = [features[SPLIT_FIT], features[SPLIT_HOLDOUT]]
    return SplitFeatures(*(torch.cat(column) for column in zip(*parts)))


def extract_features(
    features_of: FrozenBackbone, parts, size: int, batch_size: int, num_workers: int, corrupt_log
) -> Dict[int, SplitFeatures]:
    """Centre-crop features of every image of `parts` ([(source, split id)]), as
    {split id: SplitFeatures}."""
    loader = torch.utils.data.DataLoader(
        data.EvalImages(parts, size, corrupt_log),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=features_of.device.type == "cuda",
    )
    columns: Dict[str, List[torch.Tensor]] = {"features": [], "label": [], "split": [], "index": []}
    for batch in loader:
        valid = batch["valid"].bool()
        columns["features"].append(features_of(batch["image"][valid]).cpu())
        for name in ("label", "split", "index"):
            columns[name].append(batch[name][valid])
    features, labels, splits, indices = (
        torch.cat(columns[k]) for k in ("features", "label", "split", "index")
    )
    return {
        split: SplitFeatures(
            features[splits == split], labels[splits == split], indices[splits == split]
        )
        for _, split in parts
    }


# ------------------------------------------------------------------------------------------
# Augmented training of the heads: random-resized crop + flip of the labeled images
# ------------------------------------------------------------------------------------------


class AugmentedImages(torch.utils.data.Dataset):
    """Random-resized crops (torchvision's sampling, sample_crop_boxes) with a random
    horizontal flip, of a labeled source; items are (index, epoch) pairs so every crop is a
    pure function of (seed, epoch, index). A batch comes out of __getitems__ whole:
    {"image": float 0-255 [B, 3, S, S], "label", "valid"}.

    Arrays (CIFAR-10, STL-10) are cropped as a batch with crop_resize_batch, the way
    training crops them; encoded files are decoded and cropped one by one as training crops
    them (images.EncodedImage.crops), so only crops leave the loader."""

    def __init__(self, source, size: int, crop_scale, crop_ratio, seed: int, corrupt_log):
        self.source, self.size, self.seed, self.corrupt_log = source, size, seed, corrupt_log
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, items: Sequence[Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        indices = [int(i) for i, _ in items]
        keys = item_keys(self.seed, items)
        u = uniforms(keys, 4 * CROP_ATTEMPTS + 1, stream=AUGMENT_STREAM)
        crop_u, flip = u[:, : 4 * CROP_ATTEMPTS], u[:, 4 * CROP_ATTEMPTS] < 0.5
        valid = torch.ones(len(indices), dtype=torch.bool)
        if self.source.fixed_size is not None:
            images = self.source.tensor(indices)
            h = torch.full((len(indices),), images.shape[-2])
            w = torch.full((len(indices),), images.shape[-1])
            boxes = sample_crop_boxes(crop_u, h, w, self.crop_scale, self.crop_ratio)
            crops = crop_resize_batch(images, boxes, self.size)
        else:
            crops = torch.zeros(len(indices), 3, self.size, self.size)
            for j, image in enumerate(self.source.load_many(indices)):
                if not isinstance(image, data.CorruptImageError):
                    image = crops_or_error(
                        image,
                        sample_crop_boxes(
                            crop_u[j : j + 1],
                            torch.tensor([image.height]),
                            torch.tensor([image.width]),
                            self.crop_scale,
                            self.crop_ratio,
                        ),
                        self.size,
                    )
                if isinstance(image, data.CorruptImageError):
                    self.corrupt_log.report(image)
                    valid[j] = False
                else:
                    crops[j] = image[0].float()
        crops = torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
        labels = torch.as_tensor(self.source.labels[indices], dtype=torch.int64)
        return {"image": crops, "label": labels, "valid": valid}

    @staticmethod
    def collate(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """collate_fn: __getitems__ already returns a whole batch."""
        return batch


class ShuffledBatches(torch.utils.data.Sampler):
    """Every image once per epoch in a seeded order, in batches of (index, epoch) pairs; the
    last batch may be short. Set `epoch` before each pass."""

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        self.num_samples, self.batch_size, self.seed, self.epoch = num_samples, batch_size, seed, 0

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self):
        order = epoch_permutation(self.seed, self.epoch, self.num_samples)
        for start in range(0, self.num_samples, self.batch_size):
            yield [(i, self.epoch) for i in order[start : start + self.batch_size]]


def train_heads_augmented(
    features_of: FrozenBackbone,
    dataset: AugmentedImages,
    scale: Tuple[torch.Tensor, torch.Tensor],
    feature_dim: int,
    num_classes: int,
    lrs: Sequence[float],
    epochs: int,
    batch_size: int,
    seed: int,
    num_workers: int,
    on_epoch: Optional[Callable[[int, int], None]] = None,
) -> LinearHeads:
    """The same heads, optimiser and LR schedule as probe.train_heads_on_features, with a
    fresh augmented view of every image each epoch instead of cached features."""
    device = features_of.device
    mean, std = (t.to(device) for t in scale)
    sampler = ShuffledBatches(len(dataset), batch_size, seed)
    loader = batch_loader(dataset, sampler, num_workers, device)
    heads = LinearHeads(feature_dim, num_classes, lrs, seed).to(device)
    total = epochs * len(sampler)
    start = time.time()
    for epoch in range(epochs):
        sampler.epoch = epoch  # read when the loader starts the pass, in this process
        for i, batch in enumerate(loader):
            valid = batch["valid"]
            features = (features_of(batch["image"][valid]) - mean) / std
            heads.set_progress((epoch * len(sampler) + i) / total)
            if len(features):
                # Callers may run under no_grad (as Determined's validation does).
                with torch.enable_grad():
                    heads.train_step(features, batch["label"][valid].to(device))
        elapsed = time.time() - start
        logger.info(
            "classifier epoch %d/%d  %s elapsed, ETA %s",
            epoch + 1,
            epochs,
            format_duration(elapsed),
            format_duration(elapsed / (epoch + 1) * (epochs - epoch - 1)),
        )
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs)
    return heads


# ------------------------------------------------------------------------------------------
# The evaluation
# ------------------------------------------------------------------------------------------


class Evaluation(NamedTuple):
    """An evaluation's result and what its pictures (pictures.py) are drawn from."""

    result: Optional[Dict[str, Any]]  # evaluation.json; None: the data has fewer than 2 classes
    checkpoint: checkpoint.Checkpoint
    hparams: HParams
    seed: int
    classes: List[str]
    parts: List[Tuple[Any, int]]  # (source, split id): the images that `images` of features index
    features: Dict[int, SplitFeatures]  # SPLIT_FIT, SPLIT_HOLDOUT and SPLIT_TEST
    test_predictions: Optional[torch.Tensor]  # the chosen classifier's class for each test row


def run_evaluation(
    ckpt: checkpoint.Checkpoint,
    classifier_epochs: Optional[int] = None,
    augment: bool = True,
    lrs: Optional[Sequence[float]] = None,
    batch_size: Optional[int] = None,
    device: Optional[str] = None,
    on_epoch: Optional[Callable[[int, int], None]] = None,
    labels_required: bool = True,
) -> Evaluation:
    """Linear evaluation of the checkpoint's online backbone (see the module docstring): its
    `result` as a dict (per-LR and chosen accuracies, the kNN accuracy, the checkpoint, the
    protocol, image counts), with the features and the chosen classifier's test predictions
    kept. Data with fewer than 2 classes (a label-free run's) is refused, unless
    `labels_required` is false: then only the features are extracted and the result is None."""
    started = time.time()
    hp = checkpoint.hparams_of(ckpt)
    data_config = parse_data_config(ckpt.config.get("data"))
    epochs = classifier_epochs if classifier_epochs is not None else hp.probe.epochs
    lrs = [float(v) for v in (lrs or hp.probe.lrs)]
    batch_size = batch_size or hp.probe.batch_size
    if epochs < 1 or batch_size < 1 or not lrs or any(lr <= 0 for lr in lrs):
        raise ConfigError(
            f"classifier epochs ({epochs}) and batch size ({batch_size}) must be >= 1 and the LRs "
            f"({lrs}) positive"
        )
    seed = parse_run_config(ckpt.config).seed
    dev = resolve(device)
    precision = autocast_dtype(hp.precision, dev)

    splits = data.build_splits(hp.dataset_name, data_config)
    if splits.labeled_train is None:
        raise ConfigError(
            f"the evaluation needs labeled images and data.unlabeled_dir "
            f"{data_config.unlabeled_dir!r} has none: give <class>/<image> folders with "
            f"--set data.train_dir=... --set data.test_dir=..."
        )
    classes = splits.labeled_train.classes
    labelled = len(classes) >= 2
    if not labelled and labels_required:
        raise ConfigError(
            f"the labeled training images have {len(classes)} class(es) ({classes}); "
            f"linear evaluation needs at least 2"
        )
    parts = labeled_parts(splits.labeled_train, splits.test, hp.probe.holdout_fraction, seed)
    (fit_source, _), (held_source, _), _ = parts
    size = hp.augmentation.image_size
    corrupt_log = data.CorruptImageLog(data_config.strict_images)
    workers = data.loader_workers(data_config.num_workers)

    backbone, feature_dim = checkpoint.load_backbone(ckpt, hp)
    mean, std = checkpoint.normalization(ckpt)
    features_of = FrozenBackbone(backbone, hp.backbone_name, mean, std, dev, precision)
    logger.info(
        "extracting centre-crop features of %d fit, %d held-out and %d test images",
        len(fit_source),
        len(held_source),
        len(splits.test),
    )
    feats = extract_features(features_of, parts, size, batch_size, workers, corrupt_log)
    evaluation = Evaluation(None, ckpt, hp, seed, list(classes), parts, feats, None)
    if not labelled:
        return evaluation
    (fit_x, fit_y, _), (held_x, held_y, _), (test_x, test_y, _) = (
        feats[s] for s in (SPLIT_FIT, SPLIT_HOLDOUT, SPLIT_TEST)
    )
    # The kNN on the features as they are (cosine), as validation's kNN.
    bank = knn_bank(feats)
    knn = knn_accuracy(
        bank.features.to(dev),
        bank.labels.to(dev),
        test_x.to(dev),
        test_y.to(dev),
        len(classes),
        hp.probe.knn_k,
        hp.probe.knn_temperature,
    )
    fit_x, held_x, test_x = (t.to(dev) for t in standardize(fit_x, held_x, test_x))
    fit_y, held_y, test_y = (t.to(dev) for t in (fit_y, held_y, test_y))

    if augment:
        dataset = AugmentedImages(
            fit_source,
            size,
            hp.augmentation.crop_scale,
            hp.augmentation.crop_ratio,
            seed,
            corrupt_log,
        )
        heads = train_heads_augmented(
            features_of,
            dataset,
            standardization(feats[SPLIT_FIT].features),
            feature_dim,
            len(classes),
            lrs,
            epochs,
            batch_size,
            seed,
            workers,
            on_epoch,
        )
    else:
        heads = train_heads_on_features(fit_x, fit_y, len(classes), lrs, epochs, batch_size, seed)
        if on_epoch is not None:
            on_epoch(epochs, epochs)

    result = score_heads(heads, (held_x, held_y), (test_x, test_y), lrs, top5=len(classes) > 10)
    test_predictions = heads.predictions(test_x, lrs.index(result["chosen_lr"])).cpu()
    result.update(
        knn_accuracy=knn,
        checkpoint={
            "path": ckpt.path,
            "uuid": ckpt.uuid,
            "steps_completed": ckpt.steps_completed,
            "backbone_name": hp.backbone_name,
            "cifar_stem": hp.cifar_stem,
        },
        protocol={
            "augment": augment,
            "classifier_train_epochs": epochs,
            "batch_size": batch_size,
            "lrs": lrs,
            "holdout_fraction": hp.probe.holdout_fraction,
            "seed": seed,
            "image_size": size,
            "optimizer": "SGD, Nesterov momentum 0.9, cosine decay",
            "frozen_backbone": "eval mode",
            "features": "standardised by the fit split's mean/std",
            "knn_k": hp.probe.knn_k,
            "knn_temperature": hp.probe.knn_temperature,
        },
        dataset={"name": hp.dataset_name, "classes": list(classes)},
        images={"fit": len(fit_y), "holdout": len(held_y), "test": len(test_y)},
        device=str(dev),
        wall_time_s=round(time.time() - started, 1),
    )
    return evaluation._replace(result=result, test_predictions=test_predictions)
