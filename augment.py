"""BYOL's two-view augmentation, batched, on any device.

Every random number is a counter-based hash of (experiment seed, epoch, sample index, view), so a
sample's two views do not depend on the batch it lands in, the number of slots, where the
augmentation runs (training device or loader workers) or whether the run was resumed. The
parameters are sampled as torchvision samples them (tests compare the distributions), and the
pixel operations equal torchvision's functional ops (tests compare the pixels).
"""

import math
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from config import Augmentation

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


def epoch_permutation(seed: int, epoch: int, count: int) -> List[int]:
    """The seeded order of `count` images in one epoch (the training sampler's, the evaluation's)."""
    key = int(sample_keys(seed, epoch, torch.tensor([-1]))[0]) & 0x7FFFFFFFFFFFFFFF
    return torch.randperm(count, generator=torch.Generator().manual_seed(key)).tolist()


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
    fb_w = torch.where(
        in_ratio < ratio[0], ww, torch.where(in_ratio > ratio[1], (hh * ratio[1]).round(), ww)
    )
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
    # U[1 - s, 1 + s] for brightness, contrast, saturation; U[-h, h] for hue. Python numbers
    # only: no tensor is made from host values (no host-to-device copy on a GPU).
    strengths = (aug.brightness, aug.contrast, aug.saturation)
    factors = torch.stack([1 - s + 2 * s * f[:, i] for i, s in enumerate(strengths)], dim=1)
    hue = -aug.hue + 2 * aug.hue * f[:, 3:]
    # Samples without jitter get identity factors (1, 1, 1) and no hue shift (0).
    on = jitter_on[:, None]
    jitter = torch.cat([torch.where(on, factors, 1.0), torch.where(on, hue, 0.0)], dim=1)
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
    s = torch.where(
        maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc)
    )
    v = maxc
    # HSV -> RGB via the k-formula: channel c = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) % 6
    # with n = 5, 3, 1 for r, g, b.
    k = torch.stack([torch.remainder(n + 6.0 * h, 6.0) for n in (5.0, 3.0, 1.0)], dim=1)
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


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the side, odd (23 px at 224, as in the BYOL paper)."""
    return max(3, int(round(image_size * 0.1)) // 2 * 2 + 1)


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
    rois = torch.cat(
        [torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1
    )
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
        self.size = aug.image_size
        self.blur_kernel_size = blur_kernel_size(aug.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self._statistics: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self):
        # Loader workers get their own copies of the statistics (never a GPU tensor).
        return dict(self.__dict__, _statistics={})

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
                if x.shape[-1] != self.size:
                    x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True)
            else:
                h = torch.full((len(images),), images.shape[-2], device=images.device)
                w = torch.full((len(images),), images.shape[-1], device=images.device)
                boxes = self.crop_boxes(keys, view, h, w)
                x = crop_resize_batch(images, boxes, self.size)
            views.append(self.pixel_ops(x / 255.0, keys, view))
        return torch.cat(views)

    def pixel_ops(self, x: torch.Tensor, keys: torch.Tensor, view: int) -> torch.Tensor:
        p = sample_view_params(self.view_uniforms(keys, view).to(x.device), self.aug, view)
        x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = color_jitter(x, p.jitter.to(x.dtype), p.jitter_order)
        x = torch.where(p.gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        x = gaussian_blur(x, p.blur_sigma, self.blur_kernel_size)
        x = torch.where(p.solarize.view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
        mean, std = self.statistics(x.device)
        return (x - mean) / std

    def statistics(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The normalisation's mean and std on `device`, copied there once."""
        if device not in self._statistics:
            self._statistics[device] = tuple(
                torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (self.mean, self.std)
            )
        return self._statistics[device]
