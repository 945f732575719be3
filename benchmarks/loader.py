"""The training loader on one core: today's pipeline and the new one side by side, in one process
on one torch thread (as a DataLoader worker), with PIL's decode alone as the reference.

    .venv/bin/python benchmarks/loader.py SOURCE [--image-size 224] [--batch 64] [--repeats 7]
        [--pixels] [--max-side N]
    .venv/bin/python benchmarks/loader.py --make-photos DIR --from PHOTO [PHOTO ...] [--count 160]
        [--short-side 333 500]
    .venv/bin/python benchmarks/loader.py --make-upscaled DIR --from-folder FOLDER [--count 160]

SOURCE is a <class>/<image> folder or a shard index (make_shards.py). A pass is what a training
loader worker does for every image of SOURCE, in the sampler's batches: read, decode, both views'
crop boxes and crops, collate.
  - "today": the pipeline before issue 27 (commit f160935), rebuilt here with PIL (TodaysImage):
    every image decoded whole in load_many, each view cut by PIL's bilinear resize with a box;
  - "new": data.TrainImages as it is (images.EncodedImage.crops);
  - "PIL decode": read and PIL's whole decode, nothing else.
  - "bytes only (decode_on: gpu)": data.TrainImages when the training GPU decodes: read, the
    header, both views' boxes, collate (the JPEG bytes travel, device_decode.py decodes them).
The passes interleave (today, new, decode, today, ...): a shared machine's drift hits all alike;
the ratio new / today is taken within each repetition. The load average is printed.

--pixels compares the new views with today's (the same boxes) over SOURCE's images, and both
with the paper's (torchvision's resized_crop, as RandomResizedCrop, of PIL's whole decode): mean
and largest absolute difference (0-255), and sharpness (mean absolute Laplacian, ratio).
--max-side N writes SOURCE (a folder) as shards twice, as they are and with make_shards.py
--max-side N, and reports their size, the new pipeline's speed on each, and the difference of
the bounded shards' views from today's views of the original images at the same regions.

--make-photos writes an ImageNet-like set from a few real photographs: random crops (35-100% of
the area, aspect 3:4 to 4:3) resized (bicubic) to a shorter side of 333-500 px (--short-side),
JPEG quality 90.
--make-upscaled writes the earlier proxy: a folder's images upscaled to a 375-px shorter side
(JPEG, quality 90, as benchmarks/gcs_read.py --upscale-to).
"""

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import make_shards  # noqa: E402
import shards  # noqa: E402
import sources  # noqa: E402
from augment import TwoViewAugmentation  # noqa: E402
from benchmarks.gcs_read import upscaled_jpeg  # noqa: E402
from config import _parse_augmentation, _Reader, parse_data_config  # noqa: E402
from images import CorruptImageError  # noqa: E402

PIL_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


class TodaysImage:
    """The loader before issue 27: load_many decoded each image whole (images.decode_image) and
    each view was PIL's bilinear resize of its box (augment.crop_resize_pil)."""

    def __init__(self, content: bytes, name: str):
        try:
            with Image.open(io.BytesIO(content)) as image:
                self.image = image.convert("RGB")
        except PIL_ERRORS as e:
            raise CorruptImageError(name, str(e).split(" <")[0]) from None
        self.width, self.height = self.image.size

    def crops(self, boxes: torch.Tensor, size: int) -> torch.Tensor:
        return torch.stack([pil_crop(self.image, box.tolist(), size) for box in boxes])


def pil_crop(image: Image.Image, box, size: int) -> torch.Tensor:
    out = image.resize((size, size), Image.BILINEAR, box=tuple(float(v) for v in box))
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)


@contextlib.contextmanager
def todays_pipeline():
    """Sources hand out TodaysImage where they hand out images.EncodedImage."""
    with mock.patch.object(sources, "EncodedImage", TodaysImage):
        with mock.patch.object(shards, "EncodedImage", TodaysImage):
            yield


def train_dataset(path: str, image_size: int, decode_on_device: bool = False):
    source = sources.open_folder(path, None, parse_data_config({}), sources.run_here)
    aug = _parse_augmentation(_Reader({"image_size": image_size}, "augmentation"))
    augment = TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1))
    log = data.CorruptImageLog(False)
    return data.TrainImages(source, augment, 0, log, decode_on_device=decode_on_device)


def batches(dataset, batch: int):
    """One epoch of the training sampler (epoch 0 on every pass: the same crops each time)."""
    order = data.epoch_order(dataset.source, batch)
    return data.EpochBatchSampler(len(dataset), batch, 1, seed=0, fixed_epoch=0, order=order)


def loader_pass(dataset, batch: int) -> float:
    """images/s of one pass: read, decode, crop, collate."""
    started, count = time.perf_counter(), 0
    for items in batches(dataset, batch):
        count += len(dataset.collate(dataset.__getitems__(items))["key"])
    return count / (time.perf_counter() - started)


def decode_pass(dataset, batch: int) -> float:
    """images/s of reading and PIL's whole decode alone."""
    started, count = time.perf_counter(), 0
    with todays_pipeline():
        for items in batches(dataset, batch):
            count += len(dataset.source.load_many([i for i, _ in items]))
    return count / (time.perf_counter() - started)


def todays_pass(dataset, batch: int) -> float:
    with todays_pipeline():
        return loader_pass(dataset, batch)


def interleaved(contenders: dict, repeats: int) -> dict:
    """{name: [images/s of each repetition]}, the contenders run in turn (after one warm-up)."""
    for run in contenders.values():
        run()
    rates = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            rates[name].append(run())
    return rates


def print_rates(rates: dict, reference: str) -> None:
    for name, values in rates.items():
        print(
            f"  {name:26s} {statistics.median(values):7.0f} images/s "
            f"(min {min(values):.0f}, max {max(values):.0f})"
        )
    for name, values in rates.items():
        if name != reference:
            ratios = [a / b for a, b in zip(values, rates[reference])]
            print(
                f"  {name} / {reference}: {statistics.median(ratios):.2f}x "
                f"(per repetition {min(ratios):.2f}-{max(ratios):.2f})"
            )


def all_views(dataset) -> list:
    """[uint8 [2, 3, S, S]] of every image, epoch 0."""
    return [item["image"] for item in dataset.__getitems__([(i, 0) for i in range(len(dataset))])]


def papers_views(dataset) -> list:
    """[uint8 [2, 3, S, S]] of every image, epoch 0, by torchvision's resized_crop (what
    RandomResizedCrop does with a box) of PIL's whole decode."""
    images = dataset.source.load_many(range(len(dataset)))
    boxes = dataset.view_boxes(data.item_keys(0, [(i, 0) for i in range(len(dataset))]), images)
    size = dataset.augment.size
    return [
        torch.stack(
            [
                TF.pil_to_tensor(
                    TF.resized_crop(image.decode(), y0, x0, y1 - y0, x1 - x0, [size] * 2)
                )
                for x0, y0, x1, y1 in image_boxes.int().tolist()
            ]
        )
        for image, image_boxes in zip(images, boxes)
    ]


def sharpness(views: torch.Tensor) -> float:
    """Mean absolute 4-neighbour Laplacian of uint8 images [..., H, W]."""
    x = views.float()
    centre = x[..., 1:-1, 1:-1]
    laplacian = (
        4 * centre - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    )
    return float(laplacian.abs().mean())


def print_difference(new: list, reference: list, what: str) -> None:
    difference = [(a.float() - b.float()).abs() for a, b in zip(new, reference)]
    mean = float(torch.cat([d.flatten() for d in difference]).mean())
    largest = max(float(d.max()) for d in difference)
    ratio = sharpness(torch.stack(new)) / sharpness(torch.stack(reference))
    print(
        f"  {what}: mean |difference| {mean:.3f}, largest {largest:.0f} (0-255) over "
        f"{len(new)} images x 2 views; sharpness ratio {ratio:.3f}"
    )


def reductions(dataset) -> dict:
    """How many images the new pipeline decodes at each JPEG reduction (1: whole)."""
    counts: dict = {}
    images = dataset.source.load_many(range(len(dataset)))
    boxes = dataset.view_boxes(data.item_keys(0, [(i, 0) for i in range(len(dataset))]), images)
    for image, image_boxes in zip(images, boxes):
        if not isinstance(image, CorruptImageError):
            r = image.jpeg_reduction(image_boxes, dataset.augment.size)
            counts[r] = counts.get(r, 0) + 1
    return dict(sorted(counts.items()))


def bytes_of(index_path: str) -> int:
    folder = os.path.dirname(index_path)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def max_side_report(folder: str, args) -> None:
    """Shards of `folder` as they are and bounded by --max-side: size, speed, pixels."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, extra in (("original", []), (f"max-side {args.max_side}", ["--max-side"])):
            dest = os.path.join(tmp, name.replace(" ", "-"))
            argv = [folder, dest] + (extra and extra + [str(args.max_side)])
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                if make_shards.main(argv) != 0:
                    sys.exit(f"error: make_shards.py {' '.join(argv)} failed")
            paths[name] = os.path.join(dest, make_shards.INDEX_NAME)
        datasets = {name: train_dataset(path, args.image_size) for name, path in paths.items()}
        print(f"shards of {folder}:")
        for name, path in paths.items():
            print(f"  {name:26s} {bytes_of(path) / 1e6:7.1f} MB")
        print(f"new pipeline on each, {args.image_size}-px crops, load {os.getloadavg()[0]:.2f}:")
        runs = {
            f"new, {name} shards": (lambda d=d: loader_pass(d, args.batch))
            for name, d in datasets.items()
        }
        runs.update(
            {
                f"PIL decode, {name}": (lambda d=d: decode_pass(d, args.batch))
                for name, d in datasets.items()
            }
        )
        rates = interleaved(runs, args.repeats)
        print_rates(rates, "new, original shards")
        original, bounded = datasets.values()
        with todays_pipeline():
            images = original.source.load_many(range(len(original)))
        keys = data.item_keys(0, [(i, 0) for i in range(len(bounded))])
        new_views = all_views(bounded)
        small = bounded.source.load_many(range(len(bounded)))
        boxes = bounded.view_boxes(keys, small)
        reference = []
        for image, little, image_boxes in zip(images, small, boxes):
            # The bounded image's boxes at the original's scale: the same regions.
            scale = torch.tensor([image.width / little.width, image.height / little.height] * 2)
            reference.append(image.crops(image_boxes * scale, args.image_size))
        print_difference(new_views, reference, f"max-side {args.max_side} vs today's originals")


def make_photos(dest: str, photos, count: int, short_side) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(dest, "photos"), exist_ok=True)
    sources = [Image.open(p).convert("RGB") for p in photos]
    for i in range(count):
        image = sources[i % len(sources)]
        area = image.width * image.height * rng.uniform(0.35, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = min(image.width, round(np.sqrt(area * aspect)))
        h = min(image.height, round(np.sqrt(area / aspect)))
        x, y = rng.integers(0, image.width - w + 1), rng.integers(0, image.height - h + 1)
        scale = rng.integers(short_side[0], short_side[1] + 1) / min(w, h)
        crop = image.resize(
            (round(w * scale), round(h * scale)), Image.BICUBIC, box=(x, y, x + w, y + h)
        )
        crop.save(os.path.join(dest, "photos", f"{i:04d}.jpg"), quality=90)
    print(f"{count} JPEGs from {len(photos)} photographs in {dest}/photos")


def make_upscaled(dest: str, folder: str, count: int) -> None:
    names, _, _ = sources.scan_class_folder(folder)
    step = max(1, len(names) // count)
    for name in names[::step][:count]:
        with open(os.path.join(folder, name), "rb") as f:
            content = upscaled_jpeg(f.read(), 375)
        path = os.path.join(dest, os.path.splitext(name)[0] + ".jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
    print(f"{min(count, len(names[::step]))} JPEGs upscaled to a 375-px shorter side in {dest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="a <class>/<image> folder or a shard index")
    parser.add_argument("--image-size", type=int, default=224, help="side of the crops")
    parser.add_argument("--batch", type=int, default=64, help="images per loader batch")
    parser.add_argument("--repeats", type=int, default=7, help="passes per pipeline")
    parser.add_argument("--pixels", action="store_true", help="compare the views' pixels")
    parser.add_argument("--max-side", type=int, help="compare shards bounded to this side")
    parser.add_argument("--make-photos", metavar="DIR", help="write an ImageNet-like set here")
    parser.add_argument("--from", dest="photos", nargs="+", metavar="PHOTO", default=[])
    parser.add_argument("--make-upscaled", metavar="DIR", help="write the upscaled proxy here")
    parser.add_argument("--from-folder", help="<class>/<image> folder of --make-upscaled")
    parser.add_argument("--count", type=int, default=160, help="images --make-* writes")
    parser.add_argument(
        "--short-side", type=int, nargs=2, default=(333, 500), help="--make-photos' range"
    )
    args = parser.parse_args()
    if args.make_photos:
        if not args.photos:
            parser.error("--make-photos needs --from PHOTO [PHOTO ...]")
        return make_photos(args.make_photos, args.photos, args.count, args.short_side)
    if args.make_upscaled:
        if not args.from_folder:
            parser.error("--make-upscaled needs --from-folder FOLDER")
        return make_upscaled(args.make_upscaled, args.from_folder, args.count)
    if not args.source:
        parser.error("give SOURCE, --make-photos or --make-upscaled")

    torch.set_num_threads(1)  # as in a DataLoader worker, where PyTorch sets one thread
    if args.max_side:
        return max_side_report(args.source, args)
    dataset = train_dataset(args.source, args.image_size)
    sizes = [(image.width, image.height) for image in dataset.source.load_many(range(len(dataset)))]
    kib = (
        np.mean([len(image.data) for image in dataset.source.load_many(range(len(dataset)))]) / 1024
    )
    print(
        f"{len(dataset)} images from {args.source}: {kib:.1f} KiB, "
        f"{np.mean([min(s) for s in sizes]):.0f} px shorter side on average; "
        f"{args.image_size}-px crops, batches of {args.batch}, one process, one torch thread"
    )
    print(f"JPEG reductions of the new pipeline (1 = whole decode): {reductions(dataset)}")
    if args.pixels:
        new = all_views(dataset)
        with todays_pipeline():
            today = all_views(dataset)
        paper = papers_views(dataset)
        print_difference(new, today, "new vs today")
        print_difference(new, paper, "new vs the paper's")
        print_difference(today, paper, "today vs the paper's")
        return
    # What a worker does when the training GPU decodes: read, header, boxes, collate.
    bytes_only = train_dataset(args.source, args.image_size, decode_on_device=True)
    start_load = os.getloadavg()[0]
    rates = interleaved(
        {
            "today": lambda: todays_pass(dataset, args.batch),
            "new": lambda: loader_pass(dataset, args.batch),
            "PIL decode alone": lambda: decode_pass(dataset, args.batch),
            "bytes only (decode_on: gpu)": lambda: loader_pass(bytes_only, args.batch),
        },
        args.repeats,
    )
    print(
        f"load average (1 min): {start_load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    print_rates(rates, "today")


if __name__ == "__main__":
    main()
