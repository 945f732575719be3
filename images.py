"""Decoding images, whole or only as far as given crops need, and the error a corrupt one raises:
shared by the image sources of sources.py and the shard reader of shards.py.

A source hands out an image with only its header read (EncodedImage: the full-resolution size,
no pixels), so the training loader can sample both views' crop boxes before decoding, then
decode once for both crops (EncodedImage.crops). That path, per image:
  - JPEG (colour or grey): torchvision's libjpeg-turbo decoder straight to a tensor, the crops
    cut out and resized by torch's uint8 antialiased bilinear resize (PIL's filter, vectorised);
  - a large JPEG whose crops allow it: decoded at 1/2, 1/4 or 1/8 of its size in the DCT domain
    (PIL's draft), still with two pixels or more per view pixel, and cropped by PIL;
  - any other format (PNG, CMYK JPEG, ...), or where torchvision's decoder fails or is gone:
    PIL's whole decode, as decode() gives, then torch's crops.
benchmarks/loader.py measures the speed and the pixel difference against a whole PIL decode and
PIL's bilinear resize.
"""

import io
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # deprecated since torchvision 0.29 (for TorchCodec): then PIL decodes
    decode_jpeg = None

# torchvision 0.29 warns at every decode that its decoders are deprecated; PIL takes over where
# they are gone, so the warning says nothing to act on.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

# The DCT scalings libjpeg decodes at (1/8, 1/4, 1/2 of each side), largest reduction first.
JPEG_REDUCTIONS = (8, 4, 2)
# A reduced decode keeps at least this many pixels per view pixel along each side of every box:
# it then cuts off at twice a view's Nyquist frequency, so it removes no detail the view can
# show. (At 1, no enlarging but no margin, the views came out softer: mean absolute Laplacian
# 0.94 of today's, against 0.99 at 2; benchmarks/loader.py.)
REDUCED_DECODE_OVERSAMPLING = 2
# Below this size torchvision's whole decode plus torch's crops is faster than PIL's reduced
# decode plus PIL's crops (measured by benchmarks/loader.py; docs/performance.md, "The training loader per
# core").
REDUCED_DECODE_MIN_PIXELS = 1_000_000
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera's JPEG with extra frames; the first is the image

_PIL_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


class CorruptImageError(ValueError):
    """An image that cannot be read. In a loader worker, strict mode raises it; PyTorch re-raises
    it in the training process as CorruptImageError(the worker's whole traceback), whose last
    line is the original message: `one_line` gives that."""

    def __init__(self, name: str, reason: Optional[str] = None):
        super().__init__(name if reason is None else f"{name}: not a decodable image ({reason})")
        self.name = name

    @property
    def one_line(self) -> str:
        last = str(self).strip().splitlines()[-1]
        return last.split("CorruptImageError: ", 1)[-1]


def _corrupt(name: str, error: Exception) -> CorruptImageError:
    reason = str(error).split(" <")[0]  # drop PIL's "<_io.BytesIO object at 0x...>"
    return CorruptImageError(name, reason)


class EncodedImage:
    """An image file's bytes with its header read: `width` and `height` (full resolution) are
    known, nothing is decoded yet. Raises CorruptImageError when the header is unreadable; a
    file broken further on raises it from decode() or crops()."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name = data, name
        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                self.width, self.height = image.size
                self.format, self.mode = image.format, image.mode
        except _PIL_ERRORS as e:
            raise _corrupt(name, e) from None

    def decode(self) -> Image.Image:
        """The whole image, RGB."""
        try:
            with Image.open(io.BytesIO(self.data)) as image:
                return image.convert("RGB")
        except _PIL_ERRORS as e:
            raise _corrupt(self.name, e) from None

    def crops(self, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """uint8 [N, 3, size, size]: the boxes (x0, y0, x1, y1) of the full-resolution image
        [N, 4], whole pixels, each resized to size x size (bilinear, antialiased), from one
        decode (see jpeg_reduction for its resolution)."""
        reduction = self.jpeg_reduction(boxes, size)
        if reduction > 1:
            return self._reduced_crops(boxes, size, reduction)
        return crop_resize(self._pixels(), boxes, size)

    def jpeg_reduction(self, boxes: torch.Tensor, size: int) -> int:
        """1, or the largest JPEG reduction that leaves every box REDUCED_DECODE_OVERSAMPLING x
        size pixels or more on each side, for a JPEG of REDUCED_DECODE_MIN_PIXELS or more."""
        if self.format not in JPEG_FORMATS or self.width * self.height < REDUCED_DECODE_MIN_PIXELS:
            return 1
        shortest = float(torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).min())
        smallest = REDUCED_DECODE_OVERSAMPLING * size
        return next((r for r in JPEG_REDUCTIONS if shortest >= smallest * r), 1)

    def _pixels(self) -> torch.Tensor:
        """The whole image, uint8 [3, H, W] (a view of H x W x 3 pixels)."""
        if decode_jpeg is not None and self.format in JPEG_FORMATS and self.mode in ("RGB", "L"):
            try:
                raw = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
                return decode_jpeg(raw, mode=ImageReadMode.RGB)
            except RuntimeError:  # PIL decodes it, or raises the CorruptImageError it always has
                pass
        return torch.from_numpy(np.array(self.decode())).permute(2, 0, 1)

    def _reduced_crops(self, boxes: torch.Tensor, size: int, reduction: int) -> torch.Tensor:
        """PIL decodes the JPEG at 1/reduction of each side: output pixel i covers full-resolution
        pixels [reduction * i, reduction * (i + 1)), so a box maps to box / reduction, where PIL's
        resize takes it with fractions (which torch's cannot)."""
        out = torch.empty(len(boxes), size, size, 3, dtype=torch.uint8)
        try:
            with Image.open(io.BytesIO(self.data)) as image:
                request = (self.width // reduction, self.height // reduction)
                drafted = image.draft("RGB", request)
                scale = self.width / drafted[1][2] if drafted else 1  # 1: draft declined
                image = image.convert("RGB")
        except _PIL_ERRORS as e:
            raise _corrupt(self.name, e) from None
        for i, box in enumerate((boxes / scale).tolist()):
            view = image.resize((size, size), Image.BILINEAR, box=tuple(box))
            out[i].numpy()[...] = np.asarray(view)
        return out.permute(0, 3, 1, 2)


class DecodedImage:
    """Pixels already in memory (CIFAR-10, STL-10 arrays), with EncodedImage's interface."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels
        self.height, self.width = pixels.shape[:2]

    def decode(self) -> Image.Image:
        return Image.fromarray(self.pixels)

    def crops(self, boxes: torch.Tensor, size: int) -> torch.Tensor:
        return crop_resize(torch.from_numpy(self.pixels).permute(2, 0, 1), boxes, size)


def device_decodable(image) -> bool:
    """Whether torchvision's decode_jpeg can take this image on the training device (nvJPEG on
    a GPU): a baseline JPEG stream in RGB or grey, its header read. Anything else the loader
    decodes (data.decode_on: gpu falls back to it)."""
    return isinstance(image, EncodedImage) and image.format == "JPEG" and image.mode in ("RGB", "L")


def crops_or_error(image, boxes: torch.Tensor, size: int):
    """`image.crops(boxes, size)`, or the CorruptImageError the image is (a source hands one out
    in place of an unreadable image) or raises when decoded: what a loader reports and
    replaces."""
    if isinstance(image, CorruptImageError):
        return image
    try:
        return image.crops(boxes, size)
    except CorruptImageError as error:
        return error


def crop_resize(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size] crops of a uint8 [3, H, W] image at the whole-pixel boxes
    (x0, y0, x1, y1) [N, 4], each resized by torch's antialiased bilinear resize (PIL's triangle
    filter; the box's own pixels only, as torchvision's resized_crop). Each crop is copied to
    channels-last first and the result is a view of N x size x size x 3 pixels: torch's uint8
    resize is fastest on interleaved channels (about 40% less time than on planar ones). On the
    image's device: a GPU's decode (data.decode_on: gpu) is cropped there the same way, the
    resize in float32 and rounded (CUDA's antialiased resize takes no uint8)."""
    out = torch.empty(len(boxes), size, size, 3, dtype=torch.uint8, device=image.device)
    in_uint8 = image.device.type == "cpu"
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().to(torch.int64).tolist()):
        crop = image[None, :, y0:y1, x0:x1].contiguous(memory_format=torch.channels_last)
        crop = crop if in_uint8 else crop.float()
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
        resized = resized if in_uint8 else resized.round_().clamp_(0, 255)
        out[i] = resized[0].permute(1, 2, 0)
    return out.permute(0, 3, 1, 2)
