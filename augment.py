"""BYOL's two-view augmentation, batched, on any device.

Every random number is a counter-based hash of (experiment seed, epoch, sample index, view), so a
sample's two views do not depend on the batch it lands in, the number of slots, where the
augmentation runs (training device or loader workers) or whether the run was resumed. The
parameters are sampled as torchvision samples them (tests compare the distributions), and the
pixel operations equal torchvision's functional ops (tests compare the pixels).
"""

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
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


def stream_uniforms(keys: torch.Tensor, count: int, streams: Sequence[int]) -> torch.Tensor:
    """[len(streams), B, count] float32 uniforms in [0, 1) for each key and stream, in one hash
    pass; `streams` separate independent uses (view 1, view 2, ...)."""
    mixed = torch.stack([keys ^ _signed(stream * 0x632BE59BD9B4E019) for stream in streams])
    slots = torch.arange(count, device=keys.device, dtype=torch.int64)
    slots = torch.stack([slots + (stream << 32) for stream in streams])
    z = splitmix64(splitmix64(mixed)[:, :, None] + slots[:, None, :])
    return _shift_right(z, 40).to(torch.float32) / float(1 << 24)


def uniforms(keys: torch.Tensor, count: int, stream: int) -> torch.Tensor:
    """[B, count] float32 uniforms in [0, 1) for each key, of one stream."""
    return stream_uniforms(keys, count, (stream,))[0]


_CONSTANTS: Dict[Tuple[Tuple[float, ...], torch.device], torch.Tensor] = {}


def device_constant(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """A float32 tensor of `values` on `device`, copied there once per process: on a GPU a
    tensor made from host values is a host-to-device copy. Traced by torch.compile, the values
    are the compiled graph's own constants: the cache's first insert would break the guard its
    lookup sets, and compile the augmentation a second time."""
    key = (tuple(float(v) for v in values), torch.device(device))
    if torch.compiler.is_compiling():
        return torch.tensor(key[0], dtype=torch.float32, device=device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(key[0], dtype=torch.float32, device=device)
    return _CONSTANTS[key]


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
    u = u.reshape(-1, CROP_ATTEMPTS, 4).to(torch.float64)
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
    attempts = torch.stack([x0, y0, crop_w, crop_h], dim=2)  # [B, attempts, (x, y, w, h)]
    chosen = attempts.gather(1, first[:, None, None].expand(-1, 1, 4))[:, 0]

    # Fallback: centred crop of the whole image clamped to the ratio range (torchvision's
    # three cases in one: a too tall image keeps its width, a too wide one its height).
    hh, ww = h[:, 0], w[:, 0]
    fb_w = torch.minimum(ww, (hh * ratio[1]).round())
    fb_h = torch.minimum(hh, (ww / ratio[0]).round())
    fallback = torch.stack(
        [torch.floor((ww - fb_w) / 2), torch.floor((hh - fb_h) / 2), fb_w, fb_h], dim=1
    )
    xywh = torch.where(fits.any(dim=1, keepdim=True), chosen, fallback)
    return torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1).to(torch.float32)


class ViewParams(NamedTuple):
    flip: torch.Tensor  # [N] bool
    jitter: torch.Tensor  # [N, 4] brightness, contrast, saturation factors and hue shift
    jitter_order: torch.Tensor  # [N, 4] permutation of 0..3 (b, c, s, h)
    gray: torch.Tensor  # [N] bool
    blur_sigma: torch.Tensor  # [N] float, 0 = no blur
    solarize: torch.Tensor  # [N] bool


def sample_view_params(u: torch.Tensor, aug: Augmentation) -> ViewParams:
    """Per-pixel augmentation parameters of both views from their uniforms
    [2, B, SLOTS_PER_VIEW]; each parameter comes out [2B, ...]: view 1 of every sample, then
    view 2. Thresholds are Python numbers or constants copied to the device once."""
    device = u.device
    flat = u.reshape(-1, SLOTS_PER_VIEW)
    col = lambda name, n=1: flat[:, _SLOTS[name] : _SLOTS[name] + n]

    def below_view_prob(slot: str, prob: str) -> torch.Tensor:
        """[2B] bool: the slot's uniform below the view's own probability `prob`."""
        probs = device_constant([getattr(spec, prob) for spec in (aug.view1, aug.view2)], device)
        return (u[..., _SLOTS[slot]] < probs.view(2, 1)).reshape(-1)

    # U[1 - s, 1 + s] for brightness, contrast, saturation; U[-h, h] for hue.
    strengths = (aug.brightness, aug.contrast, aug.saturation, aug.hue)
    widths = device_constant([2 * s for s in strengths], device)
    lows = device_constant([1 - s for s in strengths[:3]] + [-aug.hue], device)
    factors = lows + widths * col("jitter_factors", 4)
    # Samples without jitter get identity factors (1, 1, 1) and no hue shift (0).
    identity = device_constant((1.0, 1.0, 1.0, 0.0), device)
    jitter = torch.where(col("jitter_apply") < aug.jitter_prob, factors, identity)
    lo, hi = aug.blur_sigma
    sigma = lo + (hi - lo) * col("blur_sigma")[:, 0]
    blur_on = below_view_prob("blur_apply", "blur_prob")
    return ViewParams(
        flip=col("flip")[:, 0] < aug.flip_prob,
        jitter=jitter,
        jitter_order=torch.argsort(col("jitter_order", 4), dim=1),
        gray=col("gray")[:, 0] < aug.grayscale_prob,
        blur_sigma=torch.where(blur_on, sigma, 0.0),
        solarize=below_view_prob("solarize", "solarize_prob"),
    )


# ----------------------------------------------------------------------------------------------
# Pixel operations on float batches in [0, 1], [B, 3, H, W]; per-sample parameters
# ----------------------------------------------------------------------------------------------

_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights as torchvision rounds them


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma."""
    return (x * device_constant(_LUMA, x.device).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn) through HSV, as torchvision's adjust_hue."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    delta = maxc - x.amin(dim=1)
    chroma = delta > 0
    # (max - channel) / chroma for r, g, b at once.
    rc, gc, bc = ((maxc[:, None] - x) / torch.where(chroma, delta, 1.0)[:, None]).unbind(dim=1)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(chroma, h / 6.0, 0.0)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    # Saturation delta / max is 0 where max is 0 (then delta is 0 too).
    vs = maxc * (delta / torch.where(maxc > 0, maxc, 1.0))
    # HSV -> RGB via the k-formula: channel c = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) % 6
    # with n = 5, 3, 1 for r, g, b.
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h[:, None], 6.0)
    weight = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return maxc[:, None] - vs[:, None] * weight


BLEND_PASSES = 6  # up to 3 blends before the hue shift, and up to 3 after it


def jitter_passes(jitter: torch.Tensor, order: torch.Tensor):
    """Colour jitter as BLEND_PASSES blend passes around one hue pass after pass 3, for all
    samples at once: a sample's blends before its hue shift (its random order) run in passes
    0-2, those after it in passes 3-5, and its other passes are identity blends.

    Returns per sample and pass [N, BLEND_PASSES]: the blend factor, and whether the blend
    target is the mean grey level (contrast) or the grey image (saturation); brightness
    blends towards 0."""
    hue_at = torch.argmax((order == 3).to(torch.int8), dim=1, keepdim=True)  # [N, 1]
    passes = torch.arange(BLEND_PASSES, device=order.device)
    # Position in the sample's order that each pass performs; 4 and above: none.
    before = torch.where(passes < hue_at, passes, 4)
    position = torch.where(passes < 3, before, hue_at + passes - 2)
    op = torch.where(position < 4, order.gather(1, position.clamp(max=3)), 3)  # 3: identity
    factor = torch.where(op == 3, 1.0, jitter.gather(1, op.clamp(max=2)))
    return factor, (op == 1).to(jitter.dtype), (op == 2).to(jitter.dtype)


def color_jitter(x: torch.Tensor, jitter: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in a per-sample random order. Samples whose
    jitter is off carry identity factors, so the blends need no data-dependent branching.

    Brightness, contrast and saturation are one blend x <- f x + (1 - f) t with t = 0, the mean
    grey level or the grey image, so each pass costs one blend for the whole batch; the costly
    hue shift runs once (jitter_passes)."""
    factor, to_mean, to_gray = jitter_passes(jitter, order)
    view = lambda t, i: t[:, i].view(-1, 1, 1, 1)
    for i in range(BLEND_PASSES):
        if i == 3:
            shift = jitter[:, 3]
            x = torch.where((shift != 0).view(-1, 1, 1, 1), adjust_hue(x, shift), x)
        gray = grayscale(x)
        target = torch.addcmul(
            view(to_mean, i) * gray.mean(dim=(1, 2, 3), keepdim=True), gray, view(to_gray, i)
        )
        x = torch.lerp(target.expand_as(x), x, view(factor, i)).clamp_(0, 1)
    return x


def blur_kernel_size(image_size: int) -> int:
    """10% of the side, made odd, as BYOL's blur is specified (the paper's 23 x 23 at 224 px,
    SimCLR's recipe that it follows: `kernel_size=height // 10`, then `radius * 2 + 1` with
    `radius = kernel_size // 2`): 3 at 32 px, 9 at 96, 23 at 224. At least 3, so that a tiny
    image's blur still blurs. (Rounding 9.6 up to 10 made 11 at 96 px before issue 30.)"""
    return max(3, image_size // 10 // 2 * 2 + 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (0 = unchanged), reflect padding."""
    b, c, h, w = x.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    safe_sigma = torch.where(sigma > 0, sigma, 1.0).to(x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / safe_sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(x.dtype)
    kernel = torch.where((sigma > 0)[:, None], kernel, delta)
    # One kernel per (sample, channel): the grouped convolutions take [B*C, 1, ...] weights.
    kernel = kernel[:, None, :].expand(b, c, kernel_size).reshape(b * c, 1, 1, kernel_size)
    flat = x.reshape(1, b * c, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel, groups=b * c)
    flat = F.conv2d(flat, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return flat.view(b, c, h, w)


def crop_resize_batch(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    image_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Bilinear crop-and-resize of a uint8/float batch [B, 3, H, W] to [N, 3, size, size], box i
    from image image_index[i] (default: image i). Crops larger than the output average several
    samples per pixel, so shrinking does not alias."""
    if image_index is None:
        image_index = torch.arange(len(boxes), device=boxes.device)
    rois = torch.cat([image_index.to(boxes.dtype)[:, None], boxes], 1)
    samples = max(1, math.ceil(max(images.shape[-2:]) / size))
    return roi_align(images.float(), rois, output_size=size, aligned=True, sampling_ratio=samples)


class TwoViewAugmentation:
    """BYOL's augmentation of a batch of uint8 images into two normalised float views.

    Input `images` is either [B, 3, H, W] (uncropped: the random crops happen here) or
    [B, 2, 3, S, S] (the loader already cropped each view). `keys` are the per-sample keys.
    Both views go through every operation as one batch of 2B images, so a call launches the
    same few hundred kernels whatever the batch size."""

    def __init__(self, aug: Augmentation, mean: Sequence[float], std: Sequence[float]):
        self.aug = aug
        self.size = aug.image_size
        self.blur_kernel_size = blur_kernel_size(aug.image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    def view_uniforms(self, keys: torch.Tensor, view: int) -> torch.Tensor:
        return uniforms(keys, SLOTS_PER_VIEW, stream=view)

    def crop_boxes(self, keys: torch.Tensor, view: int, heights, widths) -> torch.Tensor:
        u = self.view_uniforms(keys, view)[:, _SLOTS["crop"] : _SLOTS["crop"] + 4 * CROP_ATTEMPTS]
        return sample_crop_boxes(u, heights, widths, self.aug.crop_scale, self.aug.crop_ratio)

    def __call__(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Returns [2B, 3, S, S]: view 1 of every sample, then view 2."""
        count = len(images)
        u = stream_uniforms(keys.to(images.device), SLOTS_PER_VIEW, (0, 1))  # [2, B, slots]
        if images.dim() == 5:
            x = images.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
            x = x.view(2 * count, *images.shape[2:])
            if x.shape[-1] != self.size:
                x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True)
        else:
            crop = u[..., _SLOTS["crop"] : _SLOTS["crop"] + 4 * CROP_ATTEMPTS]
            sides = [
                torch.full((2 * count,), side, device=images.device, dtype=torch.float64)
                for side in images.shape[-2:]
            ]
            boxes = sample_crop_boxes(crop, *sides, self.aug.crop_scale, self.aug.crop_ratio)
            image_index = torch.arange(2 * count, device=images.device) % count
            x = crop_resize_batch(images, boxes, self.size, image_index)
        return self.pixel_ops(x / 255.0, u)

    def pixel_ops(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Both views' pixel operations on [2B, 3, S, S] in [0, 1], parameters from the
        uniforms [2, B, SLOTS_PER_VIEW]."""
        p = sample_view_params(u, self.aug)
        x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = color_jitter(x, p.jitter, p.jitter_order)
        x = torch.where(p.gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        x = gaussian_blur(x, p.blur_sigma, self.blur_kernel_size)
        x = torch.where(p.solarize.view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
        mean = device_constant(self.mean, x.device).view(1, 3, 1, 1)
        std = device_constant(self.std, x.device).view(1, 3, 1, 1)
        return (x - mean) / std
