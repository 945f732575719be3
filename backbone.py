"""Backbone registry: a name maps to a torchvision builder and the width of its features.

Backbones start from random initialisation, as in the BYOL paper. Supervised weights come only
from a local file the user names (`pretrained_weights`); nothing is downloaded.
"""

import os
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torchvision
from torch import nn


class BackboneSpec(NamedTuple):
    build: Callable[..., nn.Module]
    feature_dim: int


BACKBONES: Dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(torchvision.models.resnet18, 512),
    "resnet34": BackboneSpec(torchvision.models.resnet34, 512),
    "resnet50": BackboneSpec(torchvision.models.resnet50, 2048),
    "resnet101": BackboneSpec(torchvision.models.resnet101, 2048),
}


def apply_cifar_stem(model: nn.Module) -> None:
    """3x3 stride-1 first conv and no max-pool, so 32-px images keep a 4x4 final feature map
    instead of 1x1."""
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def build_torchvision_model(name: str, cifar_stem: bool) -> nn.Module:
    """The torchvision ResNet (classifier `fc` included) in the shape our backbone uses; this is
    also what a user builds to load an exported backbone."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    model = BACKBONES[name].build(weights=None)
    if cifar_stem:
        apply_cifar_stem(model)
    return model


def build_backbone(
    name: str, cifar_stem: bool = False, weights_path: Optional[str] = None
) -> Tuple[nn.Module, int]:
    """Returns (backbone mapping images to pooled features, feature width)."""
    model = build_torchvision_model(name, cifar_stem)
    if weights_path is not None:
        load_local_weights(model, weights_path)
    model.fc = nn.Identity()
    return model, BACKBONES[name].feature_dim


def load_backbone_weights(
    backbone: nn.Module, state: Dict[str, torch.Tensor], name: str, cifar_stem: bool, where: str
) -> None:
    """Load BYOL backbone weights (torchvision keys, no fc) strictly: every weight of the
    backbone comes from `where`, or a ValueError says in one line what does not fit."""
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        details = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ValueError(
            f"the backbone weights of {where} do not fit {name} (cifar_stem={cifar_stem}): "
            f"{details[:300]}"
        ) from None


def load_local_weights(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_weights file {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"pretrained_weights {path!r} does not match the backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
