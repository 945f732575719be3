"""Datasets, splits and BYOL's two-view augmentation.

Data flow:
  image source (CIFAR-10 / STL-10 arrays, an image folder, a GCS prefix)
    -> TrainImages: uint8 images + a per-sample random key (no float work in the loader)
    -> TwoViewAugmentation: batched crop/flip/jitter/grayscale/blur/solarize/normalise, run on
       the training device or in the loader workers (`augment_on`), with the same code either way.

Every random number of the augmentation is a hash of (experiment seed, epoch, sample index, view),
so a sample's two views do not depend on the batch it lands in, the number of slots, where the
augmentation runs, or whether the run was resumed.
"""
import bisect
import functools
import hashlib
import io
import logging
import math
import os
import random
import re
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.ops import roi_align

from utils import Augmentation, ConfigError, DataConfig, atomic_write

logger = logging.getLogger("byol.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Normalisation statistics per dataset (ImageNet's for folders of natural photographs).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "image_folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

UNLABELED = -1

# ----------------------------------------------------------------------------------------------
# Counter-based random numbers: uniform(key, slot) is a pure function, on any device.
# ----------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic): a bijective 64-bit hash."""
    z = z + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def sample_keys(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """One 64-bit key per (seed, epoch, sample index)."""
    base = splitmix64(torch.tensor([_signed(seed)], dtype=torch.int64))
    base = splitmix64(base ^ _signed(epoch))
    return splitmix64(base ^ indices.to(torch.int64))


def item_keys(seed: int, items: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Keys of (index, epoch) items; a batch from the sampler has one epoch, hashed at once."""
    indices = torch.tensor([int(i) for i, _ in items], dtype=torch.int64)
    epochs = [int(e) for _, e in items]
    keys = torch.empty_like(indices)
    for epoch in set(epochs):
        chosen = torch.tensor([e == epoch for e in epochs])
        keys[chosen] = sample_keys(seed, epoch, indices[chosen])
    return keys


def uniforms(keys: torch.Tensor, count: int, stream: int) -> torch.Tensor:
    """[B, count] float32 uniforms in [0, 1) for each key; `stream` separates independent uses
    (view 1, view 2, ...)."""
    slots = torch.arange(count, device=keys.device, dtype=torch.int64) + (stream << 32)
    z = splitmix64(splitmix64(keys[:, None] ^ _signed(stream * 0x632BE59BD9B4E019)) + slots)
    return _shift_right(z, 40).to(torch.float32) / float(1 << 24)


# ----------------------------------------------------------------------------------------------
# Augmentation parameters (pure functions of uniforms; tested against torchvision's samplers)
# ----------------------------------------------------------------------------------------------

CROP_ATTEMPTS = 10
_SLOTS = {  # slot offsets of one view's uniforms
    "crop": 0,
    "flip": 4 * CROP_ATTEMPTS,
    "jitter_apply": 4 * CROP_ATTEMPTS + 1,
    "jitter_factors": 4 * CROP_ATTEMPTS + 2,  # 4 slots
    "jitter_order": 4 * CROP_ATTEMPTS + 6,  # 4 slots
    "gray": 4 * CROP_ATTEMPTS + 10,
    "blur_apply": 4 * CROP_ATTEMPTS + 11,
    "blur_sigma": 4 * CROP_ATTEMPTS + 12,
    "solarize": 4 * CROP_ATTEMPTS + 13,
}
SLOTS_PER_VIEW = 4 * CROP_ATTEMPTS + 14


def sample_crop_boxes(
    u: torch.Tensor,
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: Tuple[float, float],
    ratio: Tuple[float, float],
) -> torch.Tensor:
    """Random-resized-crop boxes (x0, y0, x1, y1) as torchvision's RandomResizedCrop samples
    them: up to 10 attempts of area ~ U(scale) x image area and log-aspect ~ U(log ratio); the
    first attempt that fits wins; if none fits, the largest centred crop with a ratio in range.
    `u` holds 4 uniforms per attempt: [B, 4 * CROP_ATTEMPTS]."""
    u = u.view(-1, CROP_ATTEMPTS, 4).to(torch.float64)
    h = heights.to(torch.float64)[:, None]
    w = widths.to(torch.float64)[:, None]
    area = h * w
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    crop_w = torch.sqrt(target_area * aspect).round()
    crop_h = torch.sqrt(target_area / aspect).round()
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= w) & (crop_h <= h)
    # torchvision draws the offset as randint(0, H - h + 1): an integer, uniform.
    y0 = torch.floor(u[..., 2] * (h - crop_h + 1))
    x0 = torch.floor(u[..., 3] * (w - crop_w + 1))
    first = torch.argmax(fits.to(torch.int8), dim=1)  # first fitting attempt (0 if none)
    pick = lambda t: t.gather(1, first[:, None])[:, 0]
    any_fit = fits.any(dim=1)

    # Fallback: centred crop of the whole image clamped to the ratio range.
    hh, ww = h[:, 0], w[:, 0]
    in_ratio = ww / hh
    fb_w = torch.where(in_ratio < ratio[0], ww, torch.where(in_ratio > ratio[1], (hh * ratio[1]).round(), ww))
    fb_h = torch.where(in_ratio < ratio[0], (ww / ratio[0]).round(), hh)
    fb_w = torch.where(in_ratio > ratio[1], (hh * ratio[1]).round(), fb_w)
    fb_h = torch.where(in_ratio > ratio[1], hh, fb_h)
    fb_y0 = torch.floor((hh - fb_h) / 2)
    fb_x0 = torch.floor((ww - fb_w) / 2)

    cw = torch.where(any_fit, pick(crop_w), fb_w)
    ch = torch.where(any_fit, pick(crop_h), fb_h)
    cx = torch.where(any_fit, pick(x0), fb_x0)
    cy = torch.where(any_fit, pick(y0), fb_y0)
    return torch.stack([cx, cy, cx + cw, cy + ch], dim=1).to(torch.float32)


class ViewParams(NamedTuple):
    flip: torch.Tensor  # [B] bool
    jitter: torch.Tensor  # [B, 4] brightness, contrast, saturation factors and hue shift
    jitter_order: torch.Tensor  # [B, 4] permutation of 0..3 (b, c, s, h)
    gray: torch.Tensor  # [B] bool
    blur_sigma: torch.Tensor  # [B] float, 0 = no blur
    solarize: torch.Tensor  # [B] bool


def sample_view_params(u: torch.Tensor, aug: Augmentation, view: int) -> ViewParams:
    """Per-pixel augmentation parameters of one view from its uniforms [B, SLOTS_PER_VIEW]."""
    spec = aug.view1 if view == 0 else aug.view2
    col = lambda name, n=1: u[:, _SLOTS[name] : _SLOTS[name] + n]
    jitter_on = col("jitter_apply")[:, 0] < aug.jitter_prob
    f = col("jitter_factors", 4)
    strengths = torch.tensor(
        [aug.brightness, aug.contrast, aug.saturation], device=u.device, dtype=u.dtype
    )
    factors = 1 - strengths + 2 * strengths * f[:, :3]  # U[1 - s, 1 + s]
    hue = -aug.hue + 2 * aug.hue * f[:, 3:]  # U[-h, h]
    jitter = torch.cat([factors, hue], dim=1)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=u.device, dtype=u.dtype)
    jitter = torch.where(jitter_on[:, None], jitter, identity)
    lo, hi = aug.blur_sigma
    sigma = lo + (hi - lo) * col("blur_sigma")[:, 0]
    blur_on = col("blur_apply")[:, 0] < spec.blur_prob
    return ViewParams(
        flip=col("flip")[:, 0] < aug.flip_prob,
        jitter=jitter,
        jitter_order=torch.argsort(col("jitter_order", 4), dim=1),
        gray=col("gray")[:, 0] < aug.grayscale_prob,
        blur_sigma=torch.where(blur_on, sigma, torch.zeros_like(sigma)),
        solarize=col("solarize")[:, 0] < spec.solarize_prob,
    )


# ----------------------------------------------------------------------------------------------
# Pixel operations on float batches in [0, 1], [B, 3, H, W]; per-sample parameters
# ----------------------------------------------------------------------------------------------

_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights as torchvision rounds them


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]."""
    return torch.lerp(other.expand_as(x), x, factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn) through HSV, as torchvision's adjust_hue."""
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    v = maxc
    # HSV -> RGB via the k-formula: channel c = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) % 6
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    weight = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * weight


def color_jitter(x: torch.Tensor, jitter: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in a per-sample random order. Samples whose
    jitter is off carry identity factors, so the blends need no data-dependent branching.

    Brightness, contrast and saturation are one blend x <- f x + (1 - f) t with t = 0, the mean
    grey level or the grey image, so each position costs one blend for the whole batch."""
    for position in range(4):
        op = order[:, position]
        gray = grayscale(x)
        is_contrast = (op == 1).to(x.dtype).view(-1, 1, 1, 1)
        is_saturation = (op == 2).to(x.dtype).view(-1, 1, 1, 1)
        blend_target = is_contrast * gray.mean(dim=(1, 2, 3), keepdim=True) + is_saturation * gray
        factor = jitter.gather(1, op.clamp(max=2)[:, None])[:, 0]
        factor = torch.where(op == 3, torch.ones_like(factor), factor)
        x = _blend(x, blend_target, factor)
        hue_here = (op == 3) & (jitter[:, 3] != 0)
        if x.device.type == "cpu":
            # Hue is the costly op: on a CPU shift only the images that take it here.
            chosen = hue_here.nonzero().squeeze(1)
            x = x.index_copy(0, chosen, adjust_hue(x[chosen], jitter[chosen, 3]))
        else:
            # On a GPU, nonzero() would wait for the device; computing it for all is cheaper.
            x = torch.where(hue_here.view(-1, 1, 1, 1), adjust_hue(x, jitter[:, 3]), x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (0 = unchanged), reflect padding."""
    b, c, h, w = x.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).to(x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / safe_sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where((sigma > 0)[:, None], kernel, delta)
    kernel = kernel.repeat_interleave(c, dim=0)  # [B*C, K]
    flat = x.reshape(1, b * c, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.conv2d(flat, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return flat.view(b, c, h, w)


def crop_resize_batch(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crop-and-resize of a uint8/float batch [B, 3, H, W] to [B, 3, size, size].
    Crops larger than the output average several samples per pixel, so shrinking does not alias."""
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1)
    samples = max(1, math.ceil(max(images.shape[-2:]) / size))
    return roi_align(images.float(), rois, output_size=size, aligned=True, sampling_ratio=samples)


def crop_resize_pil(image: Image.Image, box: Sequence[float], size: int) -> torch.Tensor:
    """Crop-and-resize one decoded image in the loader (large images: only crops travel)."""
    out = image.resize((size, size), Image.BILINEAR, box=tuple(float(v) for v in box))
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)


class TwoViewAugmentation:
    """BYOL's augmentation of a batch of uint8 images into two normalised float views.

    Input `images` is either [B, 3, H, W] (uncropped: the random crops happen here) or
    [B, 2, 3, S, S] (the loader already cropped each view). `keys` are the per-sample keys."""

    def __init__(self, aug: Augmentation, mean: Sequence[float], std: Sequence[float]):
        self.aug = aug
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def view_uniforms(self, keys: torch.Tensor, view: int) -> torch.Tensor:
        return uniforms(keys, SLOTS_PER_VIEW, stream=view)

    def crop_boxes(self, keys: torch.Tensor, view: int, heights, widths) -> torch.Tensor:
        u = self.view_uniforms(keys, view)[:, _SLOTS["crop"] : _SLOTS["crop"] + 4 * CROP_ATTEMPTS]
        return sample_crop_boxes(u, heights, widths, self.aug.crop_scale, self.aug.crop_ratio)

    def __call__(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Returns [2B, 3, S, S]: view 1 of every sample, then view 2."""
        views = []
        for view in (0, 1):
            if images.dim() == 5:
                x = images[:, view].float()
                if x.shape[-1] != self.aug.image_size:
                    x = F.interpolate(x, size=self.aug.image_size, mode="bilinear", antialias=True)
            else:
                h = torch.full((len(images),), images.shape[-2], device=images.device)
                w = torch.full((len(images),), images.shape[-1], device=images.device)
                boxes = self.crop_boxes(keys, view, h, w)
                x = crop_resize_batch(images, boxes, self.aug.image_size)
            views.append(self.pixel_ops(x / 255.0, keys, view))
        return torch.cat(views)

    def pixel_ops(self, x: torch.Tensor, keys: torch.Tensor, view: int) -> torch.Tensor:
        p = sample_view_params(self.view_uniforms(keys, view).to(x.device), self.aug, view)
        x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = color_jitter(x, p.jitter.to(x.dtype), p.jitter_order)
        x = torch.where(p.gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        x = gaussian_blur(x, p.blur_sigma, self.aug.blur_kernel_size)
        x = torch.where(p.solarize.view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised float, for evaluation."""
        x = images.float() / 255.0
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


# ----------------------------------------------------------------------------------------------
# Image sources: anything that yields (image, label) by index
# ----------------------------------------------------------------------------------------------


class CorruptImageError(ValueError):
    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: not a decodable image ({reason})")
        self.name = name


class ArraySource:
    """Images already decoded in one uint8 array [N, H, W, 3] (CIFAR-10, STL-10)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
        self.images, self.labels, self.classes = images, np.asarray(labels, np.int64), list(classes)
        self.fixed_size = images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def load_many(self, indices: Sequence[int]) -> List[Image.Image]:
        return [Image.fromarray(self.images[i]) for i in indices]

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


def decode_image(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).split(" <")[0]  # drop PIL's "<_io.BytesIO object at 0x...>"
        raise CorruptImageError(name, reason) from None


class FileSource:
    """Encoded images by name in a store (local directory or GCS), labels from class dirs."""

    fixed_size = None

    def __init__(self, names: Sequence[str], labels: Sequence[int], classes: Sequence[str], store, where: str):
        self.names, self.labels, self.classes = list(names), np.asarray(labels, np.int64), list(classes)
        self.store, self.where = store, where

    def __len__(self) -> int:
        return len(self.names)

    def load_many(self, indices: Sequence[int]) -> List[object]:
        """Fetches the batch's bytes together (a remote store reads them concurrently); a
        corrupt image comes back as a CorruptImageError in its place."""
        blobs = self.store.read_many([self.names[i] for i in indices])
        out: List[object] = []
        for i, data in zip(indices, blobs):
            try:
                out.append(decode_image(data, self._full(i)))
            except CorruptImageError as e:
                out.append(e)
        return out

    def _full(self, index: int) -> str:
        return f"{self.where.rstrip('/')}/{self.names[index]}"


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
            f"extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    return names, labels, classes


def scan_unlabeled_folder(root: str) -> List[str]:
    if not os.path.isdir(root):
        raise ConfigError(f"data.unlabeled_dir {root!r} does not exist or is not a directory")
    names = [
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in sorted(os.walk(root, followlinks=True))
        for f in sorted(files)
        if f.lower().endswith(IMAGE_EXTENSIONS)
    ]
    if not names:
        raise ConfigError(f"data.unlabeled_dir {root!r} holds no images")
    return names


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


# ----------------------------------------------------------------------------------------------
# Dataset choice: which sources make up BYOL training, the labeled split, the test split
# ----------------------------------------------------------------------------------------------


class DatasetSplits(NamedTuple):
    byol_train: object  # what BYOL trains on (labels unused)
    labeled_train: object  # labeled images the linear probe trains on
    test: object  # labeled images the probe is scored on (or held-out images for the loss)
    normalization: Tuple[Sequence[float], Sequence[float]]


def _torchvision_arrays(dataset) -> Tuple[np.ndarray, np.ndarray]:
    data = np.asarray(dataset.data)
    if data.shape[1] == 3:  # STL-10 keeps [N, 3, H, W]
        data = data.transpose(0, 2, 3, 1)
    labels = np.asarray(dataset.targets if hasattr(dataset, "targets") else dataset.labels)
    return np.ascontiguousarray(data), labels


def run_here(fn: Callable):
    return fn()


def build_splits(dataset_name: str, data: DataConfig, share: Callable = run_here) -> DatasetSplits:
    """Open the dataset named in the hyperparameters. Fails with a ConfigError naming the path or
    value when the data is missing or malformed. `share(fn)` runs fn once (on the chief) and
    gives every process its result: listing a GCS prefix happens once per run."""
    root = os.path.expanduser(data.download_dir)
    if dataset_name == "cifar10":
        os.makedirs(root, exist_ok=True)
        train = download(torchvision.datasets.CIFAR10, root, train=True)
        test = download(torchvision.datasets.CIFAR10, root, train=False)
        train_src = ArraySource(*_torchvision_arrays(train), train.classes)
        test_src = ArraySource(*_torchvision_arrays(test), test.classes)
        return DatasetSplits(train_src, train_src, test_src, NORMALIZATION["cifar10"])
    if dataset_name == "stl10":
        os.makedirs(root, exist_ok=True)
        splits = {s: download(torchvision.datasets.STL10, root, split=s) for s in ("train", "unlabeled", "test")}
        train_src, unlabeled_src, test_src = (
            ArraySource(*_torchvision_arrays(splits[s]), splits["train"].classes)
            for s in ("train", "unlabeled", "test")
        )
        return DatasetSplits(
            ConcatSource([train_src, unlabeled_src]), train_src, test_src, NORMALIZATION["stl10"]
        )
    if dataset_name == "image_folder":
        for key in ("train_dir", "test_dir"):
            if getattr(data, key) is None:
                raise ConfigError(f"dataset_name=image_folder needs data.{key} (a <class>/<image> folder)")
        train_src = open_folder(data.train_dir, data.train_blob_list, data, share)
        test_src = open_folder(data.test_dir, data.test_blob_list, data, share)
        if test_src.classes != train_src.classes:
            raise ConfigError(
                f"data.test_dir {data.test_dir!r} has classes {test_src.classes} but data.train_dir "
                f"{data.train_dir!r} has {train_src.classes}; they must be the same"
            )
        byol_train = train_src
        if data.unlabeled_dir is not None:
            names = scan_unlabeled_folder(data.unlabeled_dir)
            unlabeled = FileSource(names, [UNLABELED] * len(names), train_src.classes, LocalFiles(data.unlabeled_dir), data.unlabeled_dir)
            byol_train = ConcatSource([train_src, unlabeled])
        return DatasetSplits(byol_train, train_src, test_src, NORMALIZATION["image_folder"])
    raise ConfigError(f"unknown dataset {dataset_name!r}")


def download(dataset_class, root: str, **kwargs):
    """A torchvision dataset, downloaded into `root` on first use."""
    try:
        return dataset_class(root, download=True, **kwargs)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad archive a RuntimeError
        raise ConfigError(
            f"could not download {dataset_class.__name__} into data.download_dir={root!r}: {e}. "
            f"Check the network, or put the dataset's archive there yourself"
        ) from None


def open_folder(path: str, blob_list: Optional[str], data: DataConfig, share: Callable) -> FileSource:
    """A labeled `<class>/<image>` folder, local or `gs://bucket/prefix`."""
    if path.startswith("gs://"):
        return open_gcs_folder(path, blob_list, data, share)
    names, labels, classes = scan_class_folder(path)
    return FileSource(names, labels, classes, LocalFiles(path), path)


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


# ----------------------------------------------------------------------------------------------
# torch datasets and the sampler
# ----------------------------------------------------------------------------------------------


class CorruptImageLog:
    """Logs each corrupt image once per process and counts them."""

    def __init__(self, strict: bool):
        self.strict, self.seen, self.lock = strict, set(), threading.Lock()

    def report(self, error: CorruptImageError) -> None:
        if self.strict:
            raise error
        with self.lock:
            if error.name not in self.seen:
                self.seen.add(error.name)
                logger.warning("skipping corrupt image %s", error)


class TrainImages(torch.utils.data.Dataset):
    """BYOL training items: {"image": uint8, "key": int64, "corrupt": 0/1}.

    Items are fetched by (index, epoch) pairs from EpochBatchSampler; a batch is loaded through
    `__getitems__` so remote stores can fetch it concurrently. Arrays of the training size ship
    whole ([3, H, W]) and are cropped batched; other images are decoded and both views cropped
    here ([2, 3, S, S]), so only the crops travel to the device."""

    def __init__(self, source, aug: Augmentation, seed: int, corrupt_log: CorruptImageLog, batch_transform: Optional[TwoViewAugmentation] = None):
        self.source, self.aug, self.seed, self.corrupt_log = source, aug, seed, corrupt_log
        self.crop_in_loader = source.fixed_size is None
        self.planner = TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1))
        self.batch_transform = batch_transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[Tuple[int, int]]) -> List[Dict[str, torch.Tensor]]:
        indices = [int(i) for i, _ in items]
        keys = item_keys(self.seed, items)
        if not self.crop_in_loader:
            images = self.source.tensor(indices)
            return [{"image": images[j], "key": keys[j], "corrupt": torch.tensor(0)} for j in range(len(items))]
        images, corrupt = [], []
        for index, image in zip(indices, self.source.load_many(indices)):
            corrupt.append(isinstance(image, CorruptImageError))
            if corrupt[-1]:
                self.corrupt_log.report(image)
                image = self._replacement(index)
            images.append(image)
        heights = torch.tensor([image.height for image in images])
        widths = torch.tensor([image.width for image in images])
        boxes = [self.planner.crop_boxes(keys, view, heights, widths) for view in (0, 1)]
        return [
            {
                "image": torch.stack([crop_resize_pil(image, boxes[view][j], self.aug.image_size) for view in (0, 1)]),
                "key": keys[j],
                "corrupt": torch.tensor(int(corrupt[j])),
            }
            for j, image in enumerate(images)
        ]

    def _replacement(self, index: int) -> Image.Image:
        """A corrupt image is replaced by the next decodable one, so batch shapes stay fixed."""
        for step in range(1, len(self.source)):
            candidate = self.source.load_many([(index + step) % len(self.source)])[0]
            if not isinstance(candidate, CorruptImageError):
                return candidate
            self.corrupt_log.report(candidate)
        raise ConfigError("every image of the training set is corrupt")

    def collate(self, items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        batch = torch.utils.data.default_collate(items)
        if self.batch_transform is not None:  # augment_on: loader
            batch["views"] = self.batch_transform(batch.pop("image"), batch["key"])
        return batch


SPLIT_FIT, SPLIT_HOLDOUT, SPLIT_TEST = 0, 1, 2


class EvalImages(torch.utils.data.Dataset):
    """Labeled images for the linear probe and kNN: {"image", "label", "split", "index"}.
    Large images are resized (shorter side to size * 8/7) and centre-cropped to `size`."""

    def __init__(self, parts: Sequence[Tuple[object, int]], size: int, corrupt_log: CorruptImageLog):
        self.parts, self.size, self.corrupt_log = list(parts), size, corrupt_log
        self.offsets = np.cumsum([0] + [len(src) for src, _ in self.parts]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
        out: List[Dict[str, torch.Tensor]] = [{} for _ in indices]
        by_part: Dict[int, List[int]] = {}
        for j, index in enumerate(indices):
            by_part.setdefault(bisect.bisect_right(self.offsets, index) - 1, []).append(j)
        for part, positions in by_part.items():
            source, split = self.parts[part]
            local = [indices[j] - self.offsets[part] for j in positions]
            if source.fixed_size == self.size:
                images = list(source.tensor(local))
            else:  # one load_many per part: a remote store fetches them together
                images = [self._center_crop(image) for image in source.load_many(local)]
            for j, l, image in zip(positions, local, images):
                valid = image is not None
                out[j] = {
                    "image": image if valid else torch.zeros(3, self.size, self.size, dtype=torch.uint8),
                    "label": torch.tensor(int(source.labels[l])),
                    "split": torch.tensor(split),
                    "index": torch.tensor(indices[j]),
                    "valid": torch.tensor(int(valid)),
                }
        return out

    def _center_crop(self, image) -> Optional[torch.Tensor]:
        if isinstance(image, CorruptImageError):
            self.corrupt_log.report(image)
            return None
        return center_crop(image, self.size)


def center_crop(image: Image.Image, size: int) -> torch.Tensor:
    short = min(image.size)
    resize_to = size if short == size else int(round(size * 8 / 7)) if short > size else size
    if short != resize_to:
        scale = resize_to / short
        image = image.resize((max(resize_to, round(image.width * scale)), max(resize_to, round(image.height * scale))), Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled per-slot batches of (index, epoch) pairs, a fresh permutation per epoch seeded
    by (seed, epoch). Each epoch yields `global batches x slots` per-slot batches, so Determined's
    round-robin sharding hands slot r the r-th piece of every global batch: global batch k holds
    the same images whatever the slot count. Every pass over the sampler is the next epoch,
    unless `fixed_epoch` is given: then every pass repeats that epoch (validation views)."""

    def __init__(self, num_samples: int, global_batch: int, slots: int, seed: int, fixed_epoch: Optional[int] = None):
        if num_samples < global_batch:
            raise ConfigError(
                f"the training set has {num_samples} images, fewer than one global batch "
                f"({global_batch}); lower hyperparameters.global_batch_size"
            )
        self.num_samples, self.global_batch, self.slots, self.seed = num_samples, global_batch, slots, seed
        self.batches_per_epoch = num_samples // global_batch
        self.fixed_epoch = fixed_epoch
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch * self.slots

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        if self.fixed_epoch is not None:
            epoch = self.fixed_epoch
        else:
            epoch, self.epoch = self.epoch, self.epoch + 1
        generator = torch.Generator().manual_seed(int(sample_keys(self.seed, epoch, torch.tensor([-1]))[0]) & 0x7FFFFFFFFFFFFFFF)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        per_slot = self.global_batch // self.slots
        for start in range(0, self.batches_per_epoch * self.global_batch, per_slot):
            yield [(i, epoch) for i in order[start : start + per_slot]]


# ----------------------------------------------------------------------------------------------
# Google Cloud Storage
# ----------------------------------------------------------------------------------------------
#
# A `gs://bucket/prefix` folder is read like a local class folder. Its image names come from a
# blob list (an object holding one object name per line, written by generate_blob_list.py) or,
# without one, from listing the prefix once on the chief. The bytes come through GCSFiles: a
# batch is fetched with a bounded thread pool, transient failures are retried with backoff, and
# every object can be kept on local disk after its first read.

# The google-cloud packages are imported where they are used: CIFAR-10 and STL-10 runs never
# load them.

# Transient failures (429, 5xx, dropped or reset connections, timeouts) are retried up to
# GCS_RETRY_ATTEMPTS times per request. Before try k+1 the reader sleeps a random time in
# [0, min(GCS_RETRY_CAP_S, GCS_RETRY_BASE_S * 2**(k-1))] ("full jitter"), so that many loader
# workers throttled at the same moment do not all come back at the same moment. The values are
# module-level so tests can shrink them.
GCS_RETRY_ATTEMPTS = 6
GCS_RETRY_BASE_S = 0.1
GCS_RETRY_CAP_S = 5.0
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
    error that retrying cannot fix, or a transient one still failing after every attempt.
    The message names the gs:// url; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


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
    from google.cloud.storage.exceptions import DataCorruption

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


def _describe(error: BaseException) -> str:
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
    return GCSError(f"{what}: {_describe(error)}", status)


def call_with_retries(what: str, call: Callable, sleep: Callable[[float], None] = time.sleep):
    """call() with transient failures retried (see GCS_RETRY_*). Every failure that escapes is
    a GCSError naming `what` (a gs:// url): 404, 403 and other permanent errors at once, a
    transient one after the last attempt."""
    for attempt in range(1, GCS_RETRY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as error:  # sorted into transient / permanent just below
            status = _http_status(error)
            if not _is_transient(error):
                raise _permanent_error(what, error, status) from error
            if attempt == GCS_RETRY_ATTEMPTS:
                raise GCSError(
                    f"{what}: still failing after {attempt} attempts: {_describe(error)}", status
                ) from error
            delay = random.uniform(0, min(GCS_RETRY_CAP_S, GCS_RETRY_BASE_S * 2 ** (attempt - 1)))
            logger.debug("%s: %s; retry %d of %d in %.2fs", what, _describe(error), attempt, GCS_RETRY_ATTEMPTS - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")


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


def _list_page(client, bucket: str, prefix: str, token: Optional[str]) -> Tuple[List[str], Optional[str]]:
    iterator = client.list_blobs(
        bucket, prefix=prefix or None, page_token=token, page_size=1000,
        fields="items(name),nextPageToken", retry=None, timeout=GCS_TIMEOUT_S,
    )
    page = next(iterator.pages)
    return [blob.name for blob in page], iterator.next_page_token


def list_gcs_objects(client, bucket: str, prefix: str, on_page: Optional[Callable[[int], None]] = None) -> List[str]:
    """Every object name under gs://bucket/prefix, in the bucket's (lexicographic) order. Pages
    are fetched one at a time with retries, so a transient failure in a long listing (ImageNet:
    ~1300 pages) retries that page instead of starting over. on_page(count) reports progress."""
    names: List[str] = []
    token = None
    while True:
        page, token = call_with_retries(f"gs://{bucket}/{prefix}", functools.partial(_list_page, client, bucket, prefix, token))
        names.extend(page)
        if on_page is not None:
            on_page(len(names))
        if not token:
            return names


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
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="gcs-read") if concurrency > 1 else None
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

    def __init__(self, bucket: str, prefix: str = "", cache_dir: Optional[str] = None, concurrency: int = 16):
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
                    logger.warning("cannot write the GCS cache under %s (%s); reading without it", self.cache_dir, e)
        return data

    def read_many(self, names: Sequence[str]) -> List[bytes]:
        """The objects' bytes in the order of `names`, fetched concurrently."""
        pool = self._process_state().pool
        if pool is None or len(names) <= 1:
            return [self.read(n) for n in names]
        return list(pool.map(self.read, names))


def _parse_blob_list(data: bytes, where: str) -> List[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"blob list {where} is not UTF-8 text ({e})") from None
    # One object name per line; only line endings are stripped (spaces are legal in names).
    return [line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r")]


def _find_gcs_images(store: GCSFiles, blob_list: Optional[str], url: str):
    """(names, labels, classes) of gs://bucket/prefix, or the message of a ConfigError. Runs on
    the chief only: an error is returned rather than raised so that every process raises it,
    instead of the chief failing while the others wait for its answer."""
    try:
        if blob_list:
            list_bucket, list_name = store.bucket, blob_list
            if blob_list.startswith("gs://"):
                list_bucket, _, list_name = blob_list[len("gs://") :].partition("/")
            where = f"gs://{list_bucket}/{list_name}"
            object_names = _parse_blob_list(download_object(store.client(), list_bucket, list_name), where)
        else:
            object_names = list_gcs_objects(store.client(), store.bucket, store.prefix)
        names, labels, classes = class_folder_names(object_names, store.prefix)
        if names:
            logger.info("%s: %d images in %d classes", url, len(names), len(classes))
            return names, labels, classes
        rule = f"{url.rstrip('/')}/<class>/<image> objects with extensions {', '.join(IMAGE_EXTENSIONS)}"
        if blob_list:
            first = f", the first is {object_names[0]!r}" if object_names else ""
            return (
                f"blob list {where} (for {url}) names no images under the prefix: it holds "
                f"{len(object_names)} names{first}; expected full object names of {rule}"
            )
        return f"{url} holds no images: found {len(object_names)} objects under it; expected {rule}"
    except GCSError as e:
        return f"cannot open {url}: {e}"
    except ConfigError as e:
        return str(e)
    except Exception as e:  # a bug or an unexpected failure: keep its traceback in the chief's log
        logger.exception("opening %s failed", url)
        return f"cannot open {url}: {_describe(e)}"


def open_gcs_folder(url: str, blob_list: Optional[str], data: DataConfig, share: Callable) -> FileSource:
    """A labeled gs://bucket/prefix/<class>/<image> folder. With `blob_list` (an object name in
    the same bucket, or a gs:// url) the names come from that list, else from listing the
    prefix; either way once, on the chief (`share`), with the result handed to every process."""
    bucket, prefix = parse_gcs_url(url)
    if data.gcs_concurrency < 1:
        raise ConfigError(
            f"data.gcs_concurrency={data.gcs_concurrency} must be at least 1 (parallel object "
            f"reads per loader process)"
        )
    store = GCSFiles(bucket, prefix, data.cache_dir, data.gcs_concurrency)
    found = share(functools.partial(_find_gcs_images, store, blob_list, url))
    if isinstance(found, str):
        raise ConfigError(found)
    names, labels, classes = found
    return FileSource(names, labels, classes, store, url)
