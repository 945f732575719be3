"""Linear evaluation of a trained BYOL backbone, and export of that backbone.

Local (a checkpoint directory on this machine):
    python evaluate_result.py --checkpoint CKPT_DIR --classifier-train-epochs 80
        [--no-augment] [--set DOTTED.PATH=VALUE ...] [--classifier-lrs 0.1 0.3 1]
        [--output results.json] [--export backbone.pt [--export-only]]
        [--batch-size N] [--device cpu|cuda]

Cluster (the best checkpoint of a finished experiment, evaluated as a new experiment):
    python evaluate_result.py --experiment-id 17 --classifier-train-epochs 80 [--master URL]

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
does; held-out and test images are always scored on centre crops.
"""

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

import checkpoint
import data
import utils
from augment import (
    CROP_ATTEMPTS,
    crop_resize_batch,
    crop_resize_pil,
    epoch_permutation,
    item_keys,
    sample_crop_boxes,
    uniforms,
)
from backbone import BACKBONES, build_backbone
from device import Normalize, autocast, autocast_dtype, uses_channels_last
from probe import (
    SPLIT_FIT,
    SPLIT_HOLDOUT,
    SPLIT_TEST,
    LinearHeads,
    chosen_head,
    standardization,
    standardize,
    train_heads_on_features,
)
from utils import format_duration

logger = logging.getLogger("byol.evaluate")

EVALUATION_FILE = "evaluation.json"
EVAL_NAME_SUFFIX = "-linear-eval"
# Stream of the counter-based random numbers (uniforms) used for the evaluation crops;
# BYOL's two training views use streams 0 and 1.
AUGMENT_STREAM = 2
# Wrappers whose prefix ends up in saved keys: DistributedDataParallel ("module.") in a
# multi-slot run, torch.compile's OptimizedModule ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_BACKBONE_PREFIX = "online_backbone."


class ClusterError(RuntimeError):
    """A Determined master call failed in a way the user can fix; the message says how."""


# ------------------------------------------------------------------------------------------
# The checkpoint: config, hyperparameters, online backbone weights
# ------------------------------------------------------------------------------------------


class Checkpoint(NamedTuple):
    path: str
    uuid: str
    steps_completed: Optional[int]
    config: Dict[str, Any]  # the experiment config, hyperparameters = the trial's own values
    marker: Dict[str, Any]  # byol_checkpoint.json
    backbone_state: Dict[str, torch.Tensor]  # online backbone, torchvision resnet keys, no fc


def _read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _subdirs(path: str) -> List[str]:
    try:
        return [e.path for e in os.scandir(path) if e.is_dir()]
    except OSError:
        return []


def _checkpoints_below(path: str) -> List[str]:
    """Complete checkpoints one or two levels below `path` (a --checkpoint-dir or its
    determined/ folder), newest first: what a user most likely meant."""
    candidates = [d for child in _subdirs(path) for d in [child] + _subdirs(child)]
    found = [d for d in candidates if os.path.isfile(os.path.join(d, checkpoint.MARKER))]
    return sorted(found, key=os.path.getmtime, reverse=True)


def validate_checkpoint_path(path: str) -> str:
    """checkpoint.check, plus a hint when the path holds checkpoints further down."""
    try:
        return checkpoint.check(path)
    except utils.ConfigError as error:
        full = os.path.abspath(os.path.expanduser(path))
        below = _checkpoints_below(full) if os.path.isdir(full) else []
        if below:
            raise utils.ConfigError(
                f"{error}; it holds checkpoints, e.g. the newest: {below[0]}"
            ) from None
        raise


def online_backbone_state(
    model_state: Dict[str, torch.Tensor], where: str
) -> Dict[str, torch.Tensor]:
    """The online backbone's weights out of the BYOL network's state dict, with torchvision's
    resnet key names (conv1.weight, layer1.0.bn1.running_mean, ...). Copies are made so an
    export does not serialise storage shared with the rest of the checkpoint."""
    out = {}
    for key, value in model_state.items():
        while key.startswith(_WRAPPER_PREFIXES):  # each prefix is one dotted component
            key = key.split(".", 1)[1]
        if key.startswith(_BACKBONE_PREFIX):
            out[key[len(_BACKBONE_PREFIX) :]] = value.detach().clone().contiguous()
    if not out:
        raise utils.ConfigError(f"{where} holds no {_BACKBONE_PREFIX}* weights: not a BYOL network")
    return out


def open_checkpoint(
    path: str, overrides: Sequence[str] = (), data_section: Optional[Dict[str, Any]] = None
) -> Checkpoint:
    """Validate and read a checkpoint directory. The experiment config is the one it was
    trained with (checkpoint.stored_config); `data_section` replaces the config's data section (the evaluation task's
    own, on a cluster); `overrides` (--set) are applied last."""
    path = validate_checkpoint_path(path)
    config = checkpoint.stored_config(path)
    if data_section is not None:
        config["data"] = copy.deepcopy(data_section)
    for override in overrides:
        utils.apply_override(config, override)
    marker = _read_json(os.path.join(path, checkpoint.MARKER))
    steps = _read_json(os.path.join(path, "metadata.json")).get("steps_completed")

    weights = os.path.join(path, "state_dict.pth")
    if not os.path.isfile(weights):
        raise utils.ConfigError(
            f"checkpoint {path!r} has no state_dict.pth (not a PyTorchTrial checkpoint)"
        )
    state = checkpoint.load_state(weights)
    try:
        model_state = state["models_state_dict"][0]
    except (KeyError, IndexError, TypeError):
        raise utils.ConfigError(
            f"{weights!r} holds no models_state_dict: not a PyTorchTrial checkpoint"
        ) from None
    return Checkpoint(
        path=path,
        uuid=os.path.basename(path),
        steps_completed=steps,
        config=config,
        marker=marker,
        backbone_state=online_backbone_state(model_state, weights),
    )


def hparams_of(ckpt: Checkpoint) -> utils.HParams:
    """The hyperparameters the checkpoint was trained with, typed."""
    return utils.parse_hparams(ckpt.config.get("hyperparameters", {}), 1)


def load_backbone(ckpt: Checkpoint, hp: utils.HParams) -> Tuple[torch.nn.Module, int]:
    """The online backbone with the checkpoint's weights, frozen, in eval mode."""
    # No pretrained_weights: the checkpoint's weights replace them, and the file need not
    # exist on this machine.
    backbone, feature_dim = build_backbone(hp.backbone_name, hp.cifar_stem, None)
    try:
        backbone.load_state_dict(ckpt.backbone_state, strict=True)
    except RuntimeError as e:
        details = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise utils.ConfigError(
            f"the checkpoint's backbone weights do not fit {hp.backbone_name} "
            f"(cifar_stem={hp.cifar_stem}): {details[:300]}"
        ) from None
    return backbone.eval().requires_grad_(False), feature_dim


def normalization(ckpt: Checkpoint) -> Tuple[List[float], List[float]]:
    """The normalisation the backbone was trained with (recorded in byol_checkpoint.json)."""
    norm = ckpt.marker["normalization"]
    return list(norm["mean"]), list(norm["std"])


# ------------------------------------------------------------------------------------------
# Export: the online backbone as a plain torchvision state dict, plus a JSON sidecar
# ------------------------------------------------------------------------------------------


def sidecar_path(export_path: str) -> str:
    base, ext = os.path.splitext(export_path)
    return base + ".json" if ext != ".json" else export_path + ".json"


def export_backbone(ckpt: Checkpoint, hp: utils.HParams, path: str) -> str:
    """Write the online backbone to `path` and its description to the .json beside it."""
    with utils.atomic_write(path, "wb") as f:
        torch.save(ckpt.backbone_state, f)
    mean, std = normalization(ckpt)
    info = {
        "architecture": hp.backbone_name,
        "cifar_stem": hp.cifar_stem,
        "feature_dim": BACKBONES[hp.backbone_name].feature_dim,
        "image_size": hp.augmentation.image_size,
        "normalization": {"mean": mean, "std": std},
        "weights": os.path.basename(path),
        "format": "torchvision ResNet state dict without fc (load with strict=False)",
        "checkpoint": ckpt.path,
        "checkpoint_uuid": ckpt.uuid,
        "steps_completed": ckpt.steps_completed,
        "dataset_name": hp.dataset_name,
    }
    sidecar = sidecar_path(path)
    with utils.atomic_write(sidecar) as f:
        json.dump(info, f, indent=2)
    logger.info("exported the online backbone to %s (description: %s)", path, sidecar)
    return sidecar


# ------------------------------------------------------------------------------------------
# Features of the frozen backbone
# ------------------------------------------------------------------------------------------


class FrozenBackbone:
    """uint8 (or 0-255 float) image batches -> float32 pooled features, without gradients,
    through the trial's own input pipeline (Normalize, autocast)."""

    def __init__(self, backbone: torch.nn.Module, mean, std, dev: torch.device, autocast_dtype):
        self.device = dev
        self.backbone = backbone.to(dev)
        if uses_channels_last(dev):
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.normalize = Normalize(mean, std, dev)
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.autocast_dtype):
            return self.backbone(self.normalize(images)).float()


def extract_features(
    features_of: FrozenBackbone, parts, size: int, batch_size: int, num_workers: int, corrupt_log
) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """Centre-crop features of every image of `parts` ([(source, split id)]), as
    {split id: (features [N, D] on the CPU, labels [N])}. Corrupt images are left out."""
    loader = torch.utils.data.DataLoader(
        data.EvalImages(parts, size, corrupt_log),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=features_of.device.type == "cuda",
    )
    columns: Dict[str, List[torch.Tensor]] = {"features": [], "label": [], "split": []}
    for batch in loader:
        valid = batch["valid"].bool()
        columns["features"].append(features_of(batch["image"][valid]).cpu())
        columns["label"].append(batch["label"][valid])
        columns["split"].append(batch["split"][valid])
    features, labels, splits = (torch.cat(columns[k]) for k in ("features", "label", "split"))
    return {split: (features[splits == split], labels[splits == split]) for _, split in parts}


# ------------------------------------------------------------------------------------------
# Augmented training of the heads: random-resized crop + flip of the labeled images
# ------------------------------------------------------------------------------------------


class AugmentedImages(torch.utils.data.Dataset):
    """Random-resized crops (torchvision's sampling, sample_crop_boxes) with a random
    horizontal flip, of a labeled source; items are (index, epoch) pairs so every crop is a
    pure function of (seed, epoch, index). A batch comes out of __getitems__ whole:
    {"image": float 0-255 [B, 3, S, S], "label", "valid"}.

    Arrays (CIFAR-10, STL-10) are cropped as a batch with crop_resize_batch, the way
    training crops them; encoded files are decoded and cropped one by one (crop_resize_pil),
    so only crops leave the loader."""

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
                if isinstance(image, data.CorruptImageError):
                    self.corrupt_log.report(image)
                    valid[j] = False
                    continue
                box = sample_crop_boxes(
                    crop_u[j : j + 1],
                    torch.tensor([image.height]),
                    torch.tensor([image.width]),
                    self.crop_scale,
                    self.crop_ratio,
                )[0]
                crops[j] = crop_resize_pil(image, box, self.size).float()
        crops = torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
        labels = torch.as_tensor(self.source.labels[indices], dtype=torch.int64)
        return {"image": crops, "label": labels, "valid": valid}


def _whole_batch(batch):
    """collate_fn: AugmentedImages already returns a batch."""
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
    """The same heads, optimiser and LR schedule as reducers.train_heads_on_features, with a
    fresh augmented view of every image each epoch instead of cached features."""
    device = features_of.device
    mean, std = (t.to(device) for t in scale)
    sampler = ShuffledBatches(len(dataset), batch_size, seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_whole_batch,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
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
# Scoring and the report
# ------------------------------------------------------------------------------------------


def score_heads(
    heads: LinearHeads,
    held: Tuple[torch.Tensor, torch.Tensor],
    test: Tuple[torch.Tensor, torch.Tensor],
    lrs: Sequence[float],
    top5: bool,
) -> Dict[str, Any]:
    """Per-LR held-out and test accuracy; the LR is chosen as the in-training probe chooses it
    (probe.chosen_head)."""
    accuracy = lambda split, k: (
        heads.correct(split[0], split[1], k=k).float() / max(1, len(split[1]))
    ).tolist()
    held_top1, test_top1 = accuracy(held, 1), accuracy(test, 1)
    test_top5 = accuracy(test, 5) if top5 else None
    best = chosen_head(held_top1)
    classifiers = []
    for i, lr in enumerate(lrs):
        row = {"lr": lr, "holdout_accuracy": held_top1[i], "test_accuracy": test_top1[i]}
        if top5:
            row["test_top5_accuracy"] = test_top5[i]
        classifiers.append(row)
    result = {
        "classifiers": classifiers,
        "chosen_lr": lrs[best],
        "holdout_accuracy": held_top1[best],
        "test_accuracy": test_top1[best],
    }
    if top5:
        result["test_top5_accuracy"] = test_top5[best]
    return result


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def format_report(result: Dict[str, Any]) -> str:
    top5 = "test_top5_accuracy" in result
    header = (
        ["classifier LR", "held-out top-1", "test top-1"] + (["test top-5"] if top5 else []) + [""]
    )
    rows = []
    for row in result["classifiers"]:
        cells = [
            f"{row['lr']:g}",
            _percent(row["holdout_accuracy"]),
            _percent(row["test_accuracy"]),
        ]
        if top5:
            cells.append(_percent(row["test_top5_accuracy"]))
        rows.append(cells + ["<- chosen" if row["lr"] == result["chosen_lr"] else ""])
    ckpt, protocol, images = result["checkpoint"], result["protocol"], result["images"]
    epochs = protocol["classifier_train_epochs"]
    training = (
        "random-resized crop + flip" if protocol["augment"] else "cached centre-crop features"
    )
    title = (
        f"Linear evaluation of {ckpt['path']} (step {ckpt['steps_completed']}): "
        f"{epochs} epoch{'s' if epochs != 1 else ''}, {training}, "
        f"{images['fit']} fit / {images['holdout']} held-out / {images['test']} test images"
    )
    summary = (
        f"chosen LR {result['chosen_lr']:g} (held-out top-1 {_percent(result['holdout_accuracy'])}): "
        f"test top-1 {_percent(result['test_accuracy'])}"
    )
    if top5:
        summary += f", test top-5 {_percent(result['test_top5_accuracy'])}"
    return "\n".join([title, utils.format_table(rows, header), summary])


def metrics_for_master(result: Dict[str, Any]) -> Dict[str, float]:
    """The result as flat validation metrics, named like the in-training probe's."""
    metrics = {
        "test_accuracy": result["test_accuracy"],
        "holdout_accuracy": result["holdout_accuracy"],
        "classifier_best_lr": result["chosen_lr"],
    }
    if "test_top5_accuracy" in result:
        metrics["test_top5_accuracy"] = result["test_top5_accuracy"]
    for row in result["classifiers"]:
        for name in ("holdout_accuracy", "test_accuracy", "test_top5_accuracy"):
            if name in row:
                metrics[f"classifier_lr_{row['lr']:g}_{name}"] = row[name]
    return metrics


# ------------------------------------------------------------------------------------------
# The evaluation
# ------------------------------------------------------------------------------------------


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise utils.ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def evaluate(
    ckpt: Checkpoint,
    classifier_epochs: Optional[int] = None,
    augment: bool = True,
    lrs: Optional[Sequence[float]] = None,
    batch_size: Optional[int] = None,
    device: Optional[str] = None,
    on_epoch: Optional[Callable[[int, int], None]] = None,
) -> Dict[str, Any]:
    """Linear evaluation of the checkpoint's online backbone (see the module docstring)."""
    started = time.time()
    hp = hparams_of(ckpt)
    data_config = utils.parse_data_config(ckpt.config.get("data"))
    epochs = classifier_epochs if classifier_epochs is not None else hp.probe.epochs
    lrs = [float(v) for v in (lrs or hp.probe.lrs)]
    batch_size = batch_size or hp.probe.batch_size
    if epochs < 1 or batch_size < 1 or not lrs or any(lr <= 0 for lr in lrs):
        raise utils.ConfigError(
            f"classifier epochs ({epochs}) and batch size ({batch_size}) must be >= 1 and the LRs "
            f"({lrs}) positive"
        )
    seed = utils.parse_run_config(ckpt.config).seed
    dev = resolve_device(device)
    precision = autocast_dtype(hp.precision, dev)

    splits = data.build_splits(hp.dataset_name, data_config)
    classes = splits.labeled_train.classes
    if len(classes) < 2:
        raise utils.ConfigError(
            f"the labeled training images have {len(classes)} class(es) ({classes}); "
            f"linear evaluation needs at least 2"
        )
    fit_idx, held_idx = data.holdout_split(
        splits.labeled_train.labels, hp.probe.holdout_fraction, seed
    )
    fit_source = data.Subset(splits.labeled_train, fit_idx)
    held_source = data.Subset(splits.labeled_train, held_idx)
    size = hp.augmentation.image_size
    corrupt_log = data.CorruptImageLog(data_config.strict_images)
    workers = data.loader_workers(data_config.num_workers)

    backbone, feature_dim = load_backbone(ckpt, hp)
    mean, std = normalization(ckpt)
    features_of = FrozenBackbone(backbone, mean, std, dev, precision)
    logger.info(
        "extracting centre-crop features of %d fit, %d held-out and %d test images",
        len(fit_source),
        len(held_source),
        len(splits.test),
    )
    feats = extract_features(
        features_of,
        [(fit_source, SPLIT_FIT), (held_source, SPLIT_HOLDOUT), (splits.test, SPLIT_TEST)],
        size,
        batch_size,
        workers,
        corrupt_log,
    )
    (fit_x, fit_y), (held_x, held_y), (test_x, test_y) = (
        feats[s] for s in (SPLIT_FIT, SPLIT_HOLDOUT, SPLIT_TEST)
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
            standardization(feats[SPLIT_FIT][0]),
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
    result.update(
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
        },
        dataset={"name": hp.dataset_name, "classes": list(classes)},
        images={"fit": len(fit_y), "holdout": len(held_y), "test": len(test_y)},
        device=str(dev),
        wall_time_s=round(time.time() - started, 1),
    )
    return result


def evaluate_as_asked(
    ckpt: Checkpoint,
    args: argparse.Namespace,
    on_epoch: Optional[Callable[[int, int], None]] = None,
) -> Dict[str, Any]:
    """evaluate() with the command line's options."""
    return evaluate(
        ckpt,
        args.classifier_train_epochs,
        not args.no_augment,
        args.classifier_lrs,
        args.batch_size,
        args.device,
        on_epoch,
    )


def write_json(path: str, value: Dict[str, Any]) -> None:
    with utils.atomic_write(path) as f:
        json.dump(value, f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------------------------
# Cluster: launch the evaluation as an experiment, and run it inside the task
# ------------------------------------------------------------------------------------------


def evaluation_experiment_config(
    original_config: Dict[str, Any],
    checkpoint_uuid: str,
    classifier_epochs: int,
    augment: bool,
    hparams: Optional[Dict[str, Any]] = None,
    overrides: Sequence[str] = (),
    batch_size: Optional[int] = None,
    lrs: Optional[Sequence[float]] = None,
) -> Dict[str, Any]:
    """The experiment config of a cluster evaluation of `checkpoint_uuid`: the training
    experiment's config (same environment, data, checkpoint storage, workspace) with one slot,
    a single-trial searcher on holdout_accuracy (nothing is chosen by test accuracy), the trial's own hyperparameter values instead
    of any search space, and evaluate_result.py as the entrypoint. Pure: no master involved."""
    config = copy.deepcopy(original_config)
    config["name"] = f"{config.get('name') or 'byol'}{EVAL_NAME_SUFFIX}"
    config["description"] = f"BYOL linear evaluation of checkpoint {checkpoint_uuid}"
    entrypoint = [
        "python3",
        "evaluate_result.py",
        "--checkpoint-uuid",
        checkpoint_uuid,
        "--classifier-train-epochs",
        str(int(classifier_epochs)),
    ]
    if not augment:
        entrypoint.append("--no-augment")
    if batch_size is not None:
        entrypoint += ["--batch-size", str(int(batch_size))]
    if lrs:
        entrypoint += ["--classifier-lrs", *(f"{float(lr):g}" for lr in lrs)]
    for override in overrides:
        entrypoint += ["--set", override]
    config["entrypoint"] = entrypoint  # a list: no shell, so values need no quoting
    config["resources"] = dict(config.get("resources") or {}, slots_per_trial=1)
    config["searcher"] = {
        "name": "single",
        "metric": "holdout_accuracy",
        "smaller_is_better": False,
    }
    if hparams is not None:
        config["hyperparameters"] = copy.deepcopy(hparams)
    # The task writes no checkpoints and reports one validation; training periods are moot.
    for key in ("min_validation_period", "min_checkpoint_period"):
        config.pop(key, None)
    return config


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@contextlib.contextmanager
def master_errors(master_url: str, experiment_id: Optional[int] = None):
    """The SDK's exceptions as one-line messages that say what to do. `experiment_id`: the
    experiment the calls inside look up, so that "not found" can name it."""
    from determined.common.api import errors

    try:
        yield
    except errors.NotFoundException as e:
        if experiment_id is None:
            raise ClusterError(
                f"the master at {master_url} answered 'not found': {_one_line(e)}"
            ) from None
        raise ClusterError(
            f"experiment {experiment_id} was not found on the master at {master_url} "
            f"(check the id with `det -m {master_url} experiment list`)"
        ) from None
    except errors.MasterNotFoundException:
        raise ClusterError(
            f"cannot reach a Determined master at {master_url}; set DET_MASTER or pass --master URL"
        ) from None
    except errors.UnauthenticatedException:
        raise ClusterError(
            f"not logged in to {master_url}; run `det -m {master_url} user login`"
        ) from None
    except errors.ForbiddenException as e:
        raise ClusterError(f"the master at {master_url} refused: {_one_line(e)}") from None


def launch_cluster_evaluation(
    sdk,
    experiment_id: int,
    classifier_epochs: int,
    augment: bool,
    model_dir: str,
    master_url: str,
    overrides: Sequence[str] = (),
    batch_size: Optional[int] = None,
    lrs: Optional[Sequence[float]] = None,
):
    """Find the experiment's best checkpoint and start its evaluation experiment. `sdk` is a
    determined.experimental.client.Determined (or anything with its get_experiment and
    create_experiment).
    Returns (new experiment, checkpoint)."""
    with master_errors(master_url, experiment_id):
        experiment = sdk.get_experiment(experiment_id)
        # Best first by the experiment's searcher metric (top_checkpoint() is deprecated in 0.38).
        checkpoints = experiment.list_checkpoints(max_results=1)
    if not checkpoints:
        raise ClusterError(
            f"experiment {experiment_id} has no completed checkpoint with a validation yet; "
            f"wait for its first validation or pass a local --checkpoint"
        )
    best = checkpoints[0]
    training = best.training
    if training is None:
        raise ClusterError(
            f"checkpoint {best.uuid} of experiment {experiment_id} was not saved by a trial"
        )
    config = evaluation_experiment_config(
        training.experiment_config,
        best.uuid,
        classifier_epochs,
        augment,
        hparams=training.hparams,
        overrides=overrides,
        batch_size=batch_size,
        lrs=lrs,
    )
    with master_errors(master_url):
        new = sdk.create_experiment(config, model_dir)
    return new, best


def evaluate_in_cluster(
    args: argparse.Namespace, core_context, data_section: Optional[Dict[str, Any]]
) -> Dict[str, Any]:
    """Inside the evaluation task: fetch the checkpoint from checkpoint storage, evaluate, and
    report the result as validation metrics."""
    epochs_done = {"n": 0}

    def on_epoch(done: int, total: int) -> None:
        epochs_done["n"] = done
        core_context.train.report_progress(done / total)

    with core_context.checkpoint.restore_path(args.checkpoint_uuid) as path:
        ckpt = open_checkpoint(str(path), args.overrides, data_section)
        ckpt = ckpt._replace(uuid=args.checkpoint_uuid)
        result = evaluate_as_asked(ckpt, args, on_epoch)
    print(format_report(result), flush=True)
    core_context.train.report_validation_metrics(
        steps_completed=max(1, epochs_done["n"]), metrics=metrics_for_master(result)
    )
    if args.output:
        write_json(args.output, result)
    return result


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="a local checkpoint directory")
    source.add_argument(
        "--experiment-id",
        type=int,
        metavar="ID",
        help="evaluate this experiment's best checkpoint as a new cluster experiment",
    )
    source.add_argument(
        "--checkpoint-uuid",
        metavar="UUID",
        help="(inside the cluster evaluation task) the checkpoint to evaluate",
    )
    parser.add_argument(
        "--classifier-train-epochs",
        type=int,
        metavar="N",
        help="epochs of classifier training (default: hyperparameters.classifier_train_epochs)",
    )
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="train on cached centre-crop features instead of random crops + flips (fast)",
    )
    parser.add_argument(
        "--classifier-lrs",
        type=float,
        nargs="+",
        metavar="LR",
        help="learning rates of the sweep (default: hyperparameters.classifier_lrs)",
    )
    utils.add_set_option(parser, "data.train_dir=/data/train (the checkpoint's config)")
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="classifier batch size (default: hyperparameters.classifier_batch_size)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument(
        "--output",
        metavar="FILE",
        help=f"result JSON (default: {EVALUATION_FILE} in the checkpoint)",
    )
    parser.add_argument(
        "--export",
        metavar="FILE.pt",
        help="also write the online backbone as a torchvision ResNet state dict (+ FILE.json)",
    )
    parser.add_argument(
        "--export-only", action="store_true", help="with --export: export and skip the evaluation"
    )
    parser.add_argument("--master", metavar="URL", help="Determined master (default: $DET_MASTER)")
    args = parser.parse_args(argv)
    if args.export_only and not args.export:
        parser.error("--export-only needs --export FILE.pt")
    if args.experiment_id is not None and (args.export or args.output):
        parser.error(
            "--export and --output work on a local --checkpoint; on a cluster the result "
            "is reported as the new experiment's validation metrics"
        )
    return args


def _check_writable(path: str, what: str) -> None:
    """Fail before a long evaluation, not after it."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise utils.ConfigError(
            f"cannot write {what} {path!r}: {directory!r} is not a writable directory"
        )


def run_local(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    ckpt = open_checkpoint(args.checkpoint, args.overrides)
    hp = hparams_of(ckpt)
    output = args.output or os.path.join(ckpt.path, EVALUATION_FILE)
    if args.export:
        _check_writable(args.export, "--export")
    if not args.export_only:
        _check_writable(output, "the result")
    if args.export:
        export_backbone(ckpt, hp, args.export)
        print(
            f"exported the online backbone to {args.export} (description: {sidecar_path(args.export)})"
        )
    if args.export_only:
        return None
    result = evaluate_as_asked(ckpt, args)
    write_json(output, result)
    print(format_report(result))
    print(f"wrote {output} ({result['wall_time_s']:.0f} s)")
    return result


def run_launch(args: argparse.Namespace, sdk=None) -> None:
    from determined.common import api

    if args.classifier_train_epochs is None:
        raise utils.ConfigError("--experiment-id needs --classifier-train-epochs N")
    master_url = api.canonicalize_master_url(args.master or api.get_default_master_url())
    if sdk is None:
        from determined.experimental import client

        # An explicit client object, not the module's one-login-per-process singleton.
        with master_errors(master_url):
            sdk = client.Determined(master=master_url)
    model_dir = os.path.dirname(
        os.path.abspath(__file__)
    )  # this package, as the training shipped it
    new, best = launch_cluster_evaluation(
        sdk,
        args.experiment_id,
        args.classifier_train_epochs,
        not args.no_augment,
        model_dir,
        master_url,
        overrides=args.overrides,
        batch_size=args.batch_size,
        lrs=args.classifier_lrs,
    )
    print(f"experiment {args.experiment_id}: best checkpoint {best.uuid}")
    print(f"started evaluation experiment {new.id}: {master_url}/det/experiments/{new.id}/overview")
    print(
        f"its test_accuracy appears there as a validation metric when it finishes "
        f"(logs: det -m {master_url} experiment logs {new.id} --follow)"
    )


def run_in_cluster(args: argparse.Namespace) -> None:
    import determined as det
    from determined import core

    info = det.get_cluster_info()
    if info is None:
        raise utils.ConfigError(
            "--checkpoint-uuid is for the evaluation task on a cluster; here, download the "
            "checkpoint (det checkpoint download UUID) and pass --checkpoint DIR"
        )
    with core.init() as core_context:
        evaluate_in_cluster(args, core_context, info.user_data or None)


def main(argv: Optional[List[str]] = None, sdk=None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    args = parse_args(argv)
    try:
        if args.checkpoint is not None:
            run_local(args)
        elif args.experiment_id is not None:
            run_launch(args, sdk)
        else:
            run_in_cluster(args)
    except (utils.ConfigError, ClusterError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
