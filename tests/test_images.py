"""The loader's decode-and-crop path (images.EncodedImage.crops): its views are the paper's
(torchvision's resized_crop of the whole PIL decode), or within a stated bound of them where a
large JPEG is decoded at a reduced scale; every format and fallback gives the same pixels."""

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, JpegImagePlugin

import augment
import images
from config import _parse_augmentation, _Reader
from conftest import photo_like

# The new views against today's (PIL's whole decode, PIL's bilinear resize of each box), on real
# photographs (benchmarks/loader.py --pixels; docs/performance.md, "The training loader per core"): whole
# decode mean 0.013, largest 39 (at the boxes' edges, where today's resize reads the pixels just
# outside the box and torchvision's resized_crop, like ours, does not); reduced decode of
# photographs upscaled to 1,000-1,600 px, 96-px views: mean 0.22, largest 16. The bounds asserted
# here, on the photograph-like images below:
WHOLE_MEAN, WHOLE_LARGEST = 0.05, 40
REDUCED_MEAN, REDUCED_LARGEST = 0.5, 40


def encoded(pixels: np.ndarray, image_format: str = "JPEG", mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format=image_format, quality=90)
    return out.getvalue()


def view_boxes(image, size: int, count: int, seed: int = 0) -> torch.Tensor:
    """[count * 2, 4]: both views' boxes of each of `count` keys in turn, as training samples
    them."""
    aug = _parse_augmentation(_Reader({"image_size": size}, "augmentation"))
    plan = augment.TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1))
    keys = augment.sample_keys(seed, 0, torch.arange(count))
    sides = torch.full((count,), image.height), torch.full((count,), image.width)
    views = [plan.crop_boxes(keys, view, *sides) for view in (0, 1)]
    return torch.stack(views, dim=1).reshape(-1, 4)


def papers_views(whole: Image.Image, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's resized_crop (the BYOL paper's RandomResizedCrop) of each box, on PIL."""
    return torch.stack(
        [
            TF.pil_to_tensor(TF.resized_crop(whole, y0, x0, y1 - y0, x1 - x0, [size, size]))
            for x0, y0, x1, y1 in boxes.int().tolist()
        ]
    )


def todays_views(whole: Image.Image, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The loader before issue 27: PIL's bilinear resize of each box of the whole decode."""
    return torch.stack(
        [
            TF.pil_to_tensor(whole.resize((size, size), Image.BILINEAR, box=tuple(box)))
            for box in boxes.tolist()
        ]
    )


def difference(a: torch.Tensor, b: torch.Tensor):
    d = (a.int() - b.int()).abs()
    return float(d.float().mean()), int(d.max())


@pytest.fixture(scope="module")
def photo():
    return photo_like(0, 300, 400)


@pytest.mark.parametrize(
    "image_format, mode, torchvision_decoder",
    [
        ("JPEG", "RGB", True),  # torchvision's decoder
        ("JPEG", "L", True),  # grey: torchvision's decoder, expanded to RGB
        ("JPEG", "CMYK", True),  # PIL's decoder
        ("PNG", "RGB", True),  # PIL's decoder
        ("JPEG", "RGB", False),  # where torchvision has no decoder any more
    ],
)
def test_views_are_torchvisions_resized_crop_of_the_whole_decode(
    photo, image_format, mode, torchvision_decoder, monkeypatch
):
    """Whole decodes (every image below a megapixel): each view shows exactly its box, resized
    as torchvision's resized_crop resizes it on PIL (torch's and PIL's rounding differ by one
    grey level, two at the hard edges a PNG keeps)."""
    if not torchvision_decoder:
        monkeypatch.setattr(images, "decode_jpeg", None)
    image = images.EncodedImage(encoded(photo, image_format, mode), "photo")
    for size in (224, 32):  # enlarging and shrinking crops
        boxes = view_boxes(image, size, 40)
        views = image.crops(boxes, size)
        assert views.shape == (80, 3, size, size) and views.dtype == torch.uint8
        mean, largest = difference(views, papers_views(image.decode(), boxes, size))
        assert largest <= 2 and mean < 0.05


def test_views_stay_within_the_stated_bound_of_todays_pipeline(photo):
    image = images.EncodedImage(encoded(photo), "photo")
    boxes = view_boxes(image, 224, 40)
    mean, largest = difference(image.crops(boxes, 224), todays_views(image.decode(), boxes, 224))
    assert mean <= WHOLE_MEAN and largest <= WHOLE_LARGEST


def test_a_jpeg_torchvision_rejects_is_decoded_by_pil(photo, monkeypatch):
    def rejects(*args, **kwargs):
        raise RuntimeError("decode_jpeg: unsupported")

    image = images.EncodedImage(encoded(photo), "photo")
    boxes = view_boxes(image, 64, 8)
    monkeypatch.setattr(images, "decode_jpeg", rejects)
    mean, largest = difference(image.crops(boxes, 64), papers_views(image.decode(), boxes, 64))
    assert largest <= 1


def test_array_images_crop_as_encoded_ones(photo):
    array = images.DecodedImage(photo)
    boxes = view_boxes(array, 48, 8)
    assert torch.equal(
        array.crops(boxes, 48), images.crop_resize(TF.pil_to_tensor(array.decode()), boxes, 48)
    )
    assert difference(array.crops(boxes, 48), papers_views(array.decode(), boxes, 48))[1] <= 1


@pytest.mark.parametrize(
    "side, size, expected",
    [
        (900, 96, 4),  # 900 >= 2 * 96 * 4 = 768
        (767, 96, 2),  # 767 < 768, >= 384
        (383, 96, 1),  # < 2 * 96 * 2
        (1600, 96, 8),  # >= 1536
        (900, 224, 2),  # >= 896
        (895, 224, 1),
        (1800, 224, 2),  # the other box (1700 < 2 * 224 * 4) decides
    ],
)
def test_the_reduction_keeps_two_pixels_per_view_pixel(side, size, expected):
    """The largest of 1/2, 1/4, 1/8 that leaves every box at least twice the view's side; the
    shorter side of the smaller box counts."""
    image = images.EncodedImage(encoded(np.zeros((1800, 2000, 3), np.uint8)), "big")
    boxes = torch.tensor([[0.0, 0.0, 1900.0, 1700.0], [10.0, 0.0, 10.0 + side, side]])
    assert image.jpeg_reduction(boxes, size) == expected
    assert image.jpeg_reduction(boxes[:1], size) == (2 if size == 224 else 8)  # 1700 alone
    small = images.EncodedImage(encoded(np.zeros((600, 800, 3), np.uint8)), "small")
    assert small.jpeg_reduction(torch.tensor([[0.0, 0.0, 800.0, 600.0]]), 32) == 1  # < 1 MP
    png = images.EncodedImage(encoded(np.zeros((1000, 1600, 3), np.uint8), "PNG"), "png")
    assert png.jpeg_reduction(boxes, size) == 1


def test_a_large_jpeg_is_decoded_reduced_within_the_stated_bound(monkeypatch):
    """A 1605 x 1203 photograph, 64-px views: PIL decodes it at the reduction the boxes allow
    (spied on), the views show the same regions as today's within the stated bound, and are
    not softer (mean absolute Laplacian). Its sides are no multiples of 8: a reduced decode is
    ceil(side / reduction) pixels, and a box maps by 1 / reduction, not by that size's ratio."""
    pixels = photo_like(1, 1203, 1605)
    image = images.EncodedImage(encoded(pixels), "large")
    boxes = view_boxes(image, 64, 24, seed=3)
    requested = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        requested.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    pairs = [boxes[i : i + 2] for i in range(0, len(boxes), 2)]  # a sample's two views
    views = torch.cat([image.crops(pair, 64) for pair in pairs])
    reductions = [image.jpeg_reduction(pair, 64) for pair in pairs]
    expected = [(1605 // r, 1203 // r) for r in reductions if r > 1]
    assert requested == expected and len(expected) >= 8  # most pairs are decoded reduced
    today = todays_views(image.decode(), boxes, 64)
    mean, largest = difference(views, today)
    assert mean <= REDUCED_MEAN and largest <= REDUCED_LARGEST

    def sharpness(x):
        x = x.float()
        c = x[..., 1:-1, 1:-1]
        return float(
            (4 * c - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
            .abs()
            .mean()
        )

    assert sharpness(views) >= 0.97 * sharpness(today)
