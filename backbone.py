"""Backbones: a torchvision classification model by name, its classifier removed, adapted to
small images when asked, and described so that torchvision alone can rebuild it.

Eight families are known: ResNet (with Wide ResNet and ResNeXt), RegNet, EfficientNet, ConvNeXt,
ViT and Swin; every torchvision builder of theirs is a valid `backbone_name`, plus `vit_s_16` and
`vit_ti_16`, the DeiT sizes that torchvision lacks (built by its own VisionTransformer class).
The feature width is read from the model's classifier, never typed in.

Backbones start from random initialisation, as in the BYOL paper. Supervised weights come only
from a local file the user names (`pretrained_weights`); nothing is downloaded.

A model is described by data (`architecture`): the builder's dotted name and arguments, the
modules the small-image adaptation replaces, and the classifier's path. `build_model` makes the
model from that description, and the export writes it beside the weights.
"""

import copy
import dataclasses
import difflib
import functools
import importlib
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torchvision
from torch import nn

# The DeiT sizes (Touvron et al. 2021, Table 1): hidden width, heads; 12 layers, MLP ratio 4.
EXTRA_VITS = {"vit_s_16": (384, 6), "vit_ti_16": (192, 3)}
VIT_CLASS = "torchvision.models.vision_transformer.VisionTransformer"
SWIN_CLASS = "torchvision.models.swin_transformer.SwinTransformer"


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    prefixes: Tuple[str, ...]  # of torchvision's builder names
    classifier: str  # the classifier's module path, replaced by nn.Identity
    feature_map: str  # the module whose input (or, for a ViT, output) is the final feature map
    convolutional: bool  # channels_last and LARS suit it; transformers get neither
    small_image: Callable[[nn.Module, int], Tuple[str, Dict[str, Any], Dict[str, Any]]]
    small_image_text: str


def _conv(old: nn.Conv2d, kernel_size: int, stride: int, padding: int) -> Dict[str, Any]:
    """A replacement for `old` as data: nn.Conv2d's arguments, its channels kept."""
    return {
        "type": "Conv2d",
        "in_channels": old.in_channels,
        "out_channels": old.out_channels,
        "kernel_size": kernel_size,
        "stride": stride,
        "padding": padding,
        "bias": old.bias is not None,
    }


def _stock(name: str, image_size: int) -> Tuple[str, Dict[str, Any]]:
    kwargs: Dict[str, Any] = {"weights": None}
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size  # its position embedding has one entry per patch
    return f"torchvision.models.{name}", kwargs


def _resnet_stem(model: nn.Module, image_size: int):
    # 3x3 stride-1 first conv and no max-pool: 32-px images end in 4x4, not 1x1.
    replace = {"conv1": _conv(model.conv1, 3, 1, 1), "maxpool": {"type": "Identity"}}
    return None, {}, replace


def _regnet_stem(model: nn.Module, image_size: int):
    return None, {}, {"stem.0": _conv(model.stem[0], 3, 1, 1)}  # stride 2 -> 1


def _efficientnet_stem(model: nn.Module, image_size: int):
    return None, {}, {"features.0.0": _conv(model.features[0][0], 3, 1, 1)}  # stride 2 -> 1


def _convnext_stem(model: nn.Module, image_size: int):
    return None, {}, {"features.0.0": _conv(model.features[0][0], 2, 2, 0)}  # patch 4 -> 2


def _vit_patch(model: nn.Module, image_size: int):
    # Patch 4 up to 64 px (8x8 patches at 32 px, as ViTs for CIFAR use), else 8.
    kwargs = {
        "image_size": image_size,
        "patch_size": 4 if image_size <= 64 else 8,
        "num_layers": len(model.encoder.layers),
        "num_heads": model.encoder.layers[0].self_attention.num_heads,
        "hidden_dim": model.hidden_dim,
        "mlp_dim": model.mlp_dim,
    }
    return VIT_CLASS, kwargs, {}


def _swin_patch(model: nn.Module, image_size: int):
    # Patch 2 and 4x4 windows: at 32 px the stages are 16, 8, 4 and 2 patches wide, and each
    # window fits its stage (7x7 windows would be mostly padding).
    stages = [model.features[i] for i in range(1, len(model.features), 2)]
    kwargs = {
        "patch_size": [2, 2],
        "embed_dim": model.features[0][0].out_channels,
        "depths": [len(stage) for stage in stages],
        "num_heads": [stage[0].attn.num_heads for stage in stages],
        "window_size": [4, 4],
        # The last block's drop probability is the value the builder was given.
        "stochastic_depth_prob": stages[-1][-1].stochastic_depth.p,
        "block": _dotted(type(stages[0][0])),
        "downsample_layer": _dotted(type(model.features[2])),
    }
    return SWIN_CLASS, kwargs, {}


FAMILIES = (
    Family("ResNet", ("resnet", "wide_resnet", "resnext"), "fc", "avgpool", True, _resnet_stem,
           "3x3 stride-1 first conv, no max-pool"),
    Family("RegNet", ("regnet_",), "fc", "avgpool", True, _regnet_stem, "stride-1 stem"),
    Family("EfficientNet", ("efficientnet_",), "classifier", "avgpool", True, _efficientnet_stem,
           "stride-1 stem"),
    Family("ConvNeXt", ("convnext_",), "classifier.2", "avgpool", True, _convnext_stem,
           "patch-2 stem"),
    Family("ViT", ("vit_",), "heads", "conv_proj", False, _vit_patch,
           "patch 4 up to 64 px, else 8"),
    Family("Swin", ("swin_",), "head", "avgpool", False, _swin_patch,
           "patch 2, 4x4 windows"),
)  # fmt: skip


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def known_names() -> Tuple[str, ...]:
    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    ours = [
        n for n in torchvision_names if any(n.startswith(p) for f in FAMILIES for p in f.prefixes)
    ]
    return tuple(sorted(ours + list(EXTRA_VITS)))


def family_of(name: str) -> Family:
    """The family of a backbone name, or a ValueError in one line naming the families."""
    if name in known_names():
        return next(f for f in FAMILIES if any(name.startswith(p) for p in f.prefixes))
    families = ", ".join(f"{f.name} ({'/'.join(p + '*' for p in f.prefixes)})" for f in FAMILIES)
    close = difflib.get_close_matches(str(name), known_names(), n=1)
    suggestion = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(
        f"backbone_name={name!r} is not a known backbone{suggestion}: a torchvision classifier "
        f"of the families {families}, or {' / '.join(EXTRA_VITS)}"
    )


def _stock_model(name: str, image_size: int) -> nn.Module:
    if name in EXTRA_VITS:
        hidden, heads = EXTRA_VITS[name]
        return _resolve(VIT_CLASS)(
            image_size=image_size, patch_size=16, num_layers=12, num_heads=heads,
            hidden_dim=hidden, mlp_dim=4 * hidden,
        )  # fmt: skip
    builder, kwargs = _stock(name, image_size)
    return _resolve(builder)(**kwargs)


def architecture(name: str, small_image: bool, image_size: int) -> Dict[str, Any]:
    """The description `build_model` builds from (JSON-ready): family, builder, its arguments,
    the small-image adaptation's module replacements, and the classifier's path."""
    return copy.deepcopy(_architecture(name, small_image, image_size))


@functools.lru_cache(maxsize=None)
def _architecture(name: str, small_image: bool, image_size: int) -> Dict[str, Any]:
    family = family_of(name)
    builder, kwargs = _stock(name, image_size)
    replace: Dict[str, Any] = {}
    if small_image or name in EXTRA_VITS:
        # The stock model is read for its sizes only: the global RNG stays where it was, so a
        # seeded trial initialises its network alike whether this ran before (cached) or not.
        with torch.random.fork_rng(devices=[]):
            stock = _stock_model(name, image_size)
        if name in EXTRA_VITS:
            builder, kwargs = VIT_CLASS, _vit_patch(stock, image_size)[1] | {"patch_size": 16}
        if small_image:
            adapted_builder, adapted_kwargs, replace = family.small_image(stock, image_size)
            if adapted_builder is not None:
                builder, kwargs = adapted_builder, adapted_kwargs
    return {
        "name": name,
        "family": family.name,
        "builder": builder,
        "builder_kwargs": kwargs,
        "replace_modules": replace,
        "classifier": family.classifier,
        "small_image": family.small_image_text if small_image else None,
    }


def build_model(arch: Dict[str, Any]) -> nn.Module:
    """The torchvision model an `architecture` describes, classifier included: the builder
    called with its arguments (class names resolved), then its modules replaced."""
    kwargs = {
        k: _resolve(v) if isinstance(v, str) and v.startswith("torchvision.") else v
        for k, v in arch["builder_kwargs"].items()
    }
    model = _resolve(arch["builder"])(**kwargs)
    for path, spec in arch["replace_modules"].items():
        spec = dict(spec)
        _replace(model, path, getattr(nn, spec.pop("type"))(**spec))
    return model


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def feature_map_size(arch: Dict[str, Any], image_size: int) -> Tuple[int, int]:
    """(height, width) of the final feature map on `image_size`-px images: one forward pass on
    the `meta` device (shapes only, no arithmetic)."""
    with torch.random.fork_rng(devices=[]):  # as in _architecture
        model = build_model(arch).to("meta").eval()
    family = family_of(arch["name"])
    module = model.get_submodule(family.feature_map)
    seen = []
    if family.name == "ViT":
        module.register_forward_hook(lambda m, args, out: seen.append(out.shape[-2:]))
    else:
        module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2:]))
    with torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    return tuple(seen[0])


@functools.lru_cache(maxsize=None)
def check_input_size(name: str, small_image: bool, image_size: int) -> None:
    """A ValueError in one line where the model cannot work at this size: a transformer whose
    final feature map is one patch (nothing left to attend between), or any model whose map
    vanishes. A convolutional network ending in 1x1 trains (a ResNet's ImageNet stem on 32-px
    images is a deliberate 16x saving in FLOPs), so it is allowed."""
    family = family_of(name)
    arch = architecture(name, small_image, image_size)
    try:
        height, width = feature_map_size(arch, image_size)
    except RuntimeError:  # a convolution's output size went below 1
        height = width = 0
    if min(height, width) >= (1 if family.convolutional else 2):
        return
    hint = (
        "use larger images (augmentation.image_size)"
        if small_image
        else f"set hyperparameters.cifar_stem=true ({family.small_image_text}) or use larger images"
    )
    raise ValueError(
        f"{name} ({family.name}, cifar_stem={str(small_image).lower()}) on {image_size}-px "
        f"images ends in a {height}x{width} feature map; a {family.name} needs at least "
        f"{'1x1' if family.convolutional else '2x2'}: {hint}"
    )


def feature_width(model: nn.Module, classifier: str) -> int:
    """The width of the features the classifier takes: its (last) Linear's input."""
    linears = [m for m in model.get_submodule(classifier).modules() if isinstance(m, nn.Linear)]
    return linears[-1].in_features


def is_convolutional(name: str) -> bool:
    return family_of(name).convolutional


def build_backbone(
    name: str, small_image: bool, image_size: int, weights_path: Optional[str] = None
) -> Tuple[nn.Module, int]:
    """Returns (backbone mapping images to pooled features, feature width)."""
    arch = architecture(name, small_image, image_size)
    model = build_model(arch)
    if weights_path is not None:
        load_local_weights(model, weights_path, arch["classifier"])
    width = feature_width(model, arch["classifier"])
    _replace(model, arch["classifier"], nn.Identity())
    return model, width


def load_backbone_weights(
    backbone: nn.Module, state: Dict[str, torch.Tensor], name: str, cifar_stem: bool, where: str
) -> None:
    """Load BYOL backbone weights (torchvision keys, no classifier) strictly: every weight of
    the backbone comes from `where`, or a ValueError says in one line what does not fit."""
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        details = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ValueError(
            f"the backbone weights of {where} do not fit {name} (cifar_stem={cifar_stem}): "
            f"{details[:300]}"
        ) from None


def load_local_weights(model: nn.Module, path: str, classifier: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_weights file {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier + ".")]
    if missing or unexpected:
        raise ValueError(
            f"pretrained_weights {path!r} does not match the backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
