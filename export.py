"""Export: a checkpoint's online backbone as a plain torchvision ResNet state dict (no fc), plus
a JSON description beside it (architecture, stem, normalisation, image size), for downstream
tasks that need neither this package nor Determined."""

import json
import logging
import os

import torch

from backbone import BACKBONES
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
    with atomic_write(sidecar) as f:
        json.dump(info, f, indent=2)
    logger.info("exported the online backbone to %s (description: %s)", path, sidecar)
    return sidecar
