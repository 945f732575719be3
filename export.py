"""Export: a checkpoint's online backbone as a plain torchvision state dict (no classifier), plus
a JSON description beside it (the torchvision builder and its arguments, the small-image
adaptation, normalisation, image size), for downstream tasks that need neither this package nor
Determined: torchvision alone rebuilds the model from the description."""

import json
import logging
import os

import torch

import backbone
from checkpoint import Checkpoint, normalization
from config import HParams
from utils import atomic_write

logger = logging.getLogger("byol.evaluate")


def sidecar_path(export_path: str) -> str:
    base, ext = os.path.splitext(export_path)
    return base + ".json" if ext != ".json" else export_path + ".json"


def export_backbone(ckpt: Checkpoint, hp: HParams, path: str) -> str:
    """Write the online backbone to `path` and its description to the .json beside it."""
    with atomic_write(path, "wb") as f:
        torch.save(ckpt.backbone_state, f)
    mean, std = normalization(ckpt)
    size = hp.augmentation.image_size
    arch = backbone.architecture(hp.backbone_name, hp.cifar_stem, size)
    info = {
        "architecture": hp.backbone_name,
        "family": arch["family"],
        "cifar_stem": hp.cifar_stem,
        "small_image_adaptation": arch["small_image"],
        "builder": arch["builder"],
        "builder_kwargs": arch["builder_kwargs"],
        "replace_modules": arch["replace_modules"],
        "classifier": arch["classifier"],
        "feature_dim": backbone.feature_width(backbone.build_model(arch), arch["classifier"]),
        "image_size": size,
        "normalization": {"mean": mean, "std": std},
        "weights": os.path.basename(path),
        "format": (
            "state dict of builder(**builder_kwargs) (a builder_kwargs string naming a "
            "torchvision class is that class), each module of replace_modules replaced by "
            "torch.nn.<type>(**rest), without its classifier: load with strict=False, and only "
            "the classifier's keys are missing"
        ),
        "checkpoint": ckpt.path,
        "checkpoint_uuid": ckpt.uuid,
        "steps_completed": ckpt.steps_completed,
        "dataset_name": hp.dataset_name,
    }
    sidecar = sidecar_path(path)
    with atomic_write(sidecar) as f:
        json.dump(info, f, indent=2)
    logger.info("exported the online backbone to %s (description: %s)", path, sidecar)
    return sidecar
