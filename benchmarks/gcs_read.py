"""Reading images from the GCS emulator: bytes with 1 request in flight versus the default
concurrency, and, with --images, the training loader reading one object per image versus the
same images as tar shards (make_shards.py).

    .venv/bin/python benchmarks/gcs_read.py [--count 512] [--size 64] [--latency-ms 20]
        [--images DIR] [--batch 256] [--concurrency 16]
        [--shard-size-mb 1] [--upscale-to PX] [--crop-size 32]

A loopback emulator answers in well under a millisecond, where a real bucket takes tens of
milliseconds per request; so a proxy in front of it adds --latency-ms to every request (0 turns
it off), and counts them. Server and proxy run in a child process, so they do not compete with
the reading threads for one GIL. The emulator serves one request at a time, which caps the
concurrent figures; a real bucket serves many at once. The byte reads fetch only bytes (no
decoding, no cache).

The loader runs (--images) time one loader process (this one, no workers, one torch thread as
in a DataLoader worker) doing what a training loader worker does for a batch: read, decode, and
both views' crops at --crop-size (TrainImages, the sampler's order), with no cache. They print images/s per loader process and the requests
the proxy counted per 1000 images. --upscale-to re-encodes every image as a JPEG (quality 90)
upscaled to that short side first: ImageNet-sized test images from small ones.
"""

import argparse
import contextlib
import io
import os
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from config import _parse_augmentation, _Reader, parse_data_config  # noqa: E402
from gcs_server import FakeGCSProcess  # noqa: E402

# `data`, `gcs` and the rest (and torch with them) are imported in main(): the server's child
# process re-imports this file and needs none of it.
data = gcs = augment = make_shards = torch = utils = None

BUCKET = "bench"
PREFIX = "images/"


def synthetic_jpegs(count: int, size: int):
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        yield f"class{i % 10}/img{i:05d}.jpg", out.getvalue()


def images_from(directory: str, count: int):
    names = sorted(
        os.path.relpath(os.path.join(d, f), directory)
        for d, _, files in os.walk(directory)
        for f in files
        if f.lower().endswith(sources.IMAGE_EXTENSIONS)
    )[:count]
    if not names:
        sys.exit(f"error: no images under {directory}")
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            yield name.replace(os.sep, "/"), f.read()


def upscaled_jpeg(content: bytes, short_side: int) -> bytes:
    with Image.open(io.BytesIO(content)) as image:
        image = image.convert("RGB")
    scale = short_side / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    out = io.BytesIO()
    image.resize(size, Image.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


def loader_pass(path: str, args: argparse.Namespace, server):
    """(best images/s, requests per 1000 images) of a loader process going through every image
    of the folder or shard index at `path` in the training sampler's order and batches: read,
    decode, both crops. Each pass is a fresh process's view (nothing kept from the last one);
    opening it (listing the folder, reading the index) is neither timed nor counted."""
    config = parse_data_config({"gcs_concurrency": args.concurrency})
    aug = _parse_augmentation(_Reader({"image_size": args.crop_size}, "augmentation"))
    torch.set_num_threads(1)  # as in a DataLoader worker, where PyTorch sets one thread
    best, requests, images = 0.0, 0, 0
    for _ in range(args.repeats):
        source = sources.open_folder(path, None, config, sources.run_here)
        dataset = data.TrainImages(
            source,
            augment.TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1)),
            seed=0,
            corrupt_log=data.CorruptImageLog(False),
        )
        sampler = data.EpochBatchSampler(
            len(source), args.batch, 1, seed=0, order=data.epoch_order(source, args.batch)
        )
        before = server.request_count()
        started = time.perf_counter()
        count = sum(len(dataset.__getitems__(items)) for items in sampler)
        best = max(best, count / (time.perf_counter() - started))
        requests += server.request_count() - before
        images += count
    return best, 1000 * requests / images


def measure(names, concurrency: int, batch: int, repeats: int) -> float:
    """Best images/s of `repeats` passes over `names`, read in batches as the loader does."""
    store = gcs.GCSFiles(BUCKET, PREFIX, None, concurrency)
    store.read_many(names[:concurrency])  # warm up: client, pool, connections
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(names), batch):
            store.read_many(names[start : start + batch])
        best = max(best, len(names) / (time.perf_counter() - started))
    return best


def main() -> None:
    global data, gcs, augment, make_shards, sources, torch, utils
    import torch

    import augment
    import data
    import gcs
    import make_shards
    import sources
    import utils

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=512, help="number of images")
    parser.add_argument("--size", type=int, default=64, help="side of the synthetic JPEGs")
    parser.add_argument("--images", help="upload real images from this directory instead")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every request")
    parser.add_argument("--batch", type=int, default=256, help="images per read_many call")
    parser.add_argument("--concurrency", type=int, default=16, help="threads of the concurrent run")
    parser.add_argument(
        "--repeats", type=int, default=1, help="passes per setting (the best counts)"
    )
    parser.add_argument(
        "--shard-size-mb", type=float, default=1.0, help="shard size of the loader runs"
    )
    parser.add_argument(
        "--upscale-to", type=int, default=0, help="re-encode images as JPEGs of this short side"
    )
    parser.add_argument("--crop-size", type=int, default=32, help="crop size of the loader runs")
    args = parser.parse_args()

    with FakeGCSProcess(latency_s=args.latency_ms / 1000) as server:
        os.environ["STORAGE_EMULATOR_HOST"] = server.host
        bucket = server.client().create_bucket(BUCKET)
        source = (
            images_from(args.images, args.count)
            if args.images
            else synthetic_jpegs(args.count, args.size)
        )
        names, total_bytes = [], 0
        for name, content in source:
            if args.upscale_to:
                name, content = (
                    os.path.splitext(name)[0] + ".jpg",
                    upscaled_jpeg(content, args.upscale_to),
                )
            bucket.blob(PREFIX + name).upload_from_string(content)  # direct, no added latency
            names.append(name)
            total_bytes += len(content)
        what = (
            f"{len(names)} images from {args.images}"
            if args.images
            else f"{len(names)} synthetic {args.size}x{args.size} JPEGs"
        )
        print(
            f"{what}, {total_bytes / len(names) / 1024:.1f} KiB on average, read in batches of {args.batch}"
        )
        print(
            f"gcp-storage-emulator on 127.0.0.1 (another process) behind a proxy adding "
            f"{args.latency_ms:g} ms per request to model a real bucket's latency; the emulator "
            f"serves one request at a time, which caps the concurrent figure"
        )
        serial = measure(names, 1, args.batch, args.repeats)
        concurrent = measure(names, args.concurrency, args.batch, args.repeats)
        print(f"1 request in flight:   {serial:8.1f} images/s")
        print(f"{args.concurrency} requests in flight: {concurrent:8.1f} images/s")
        print(f"speed-up: {concurrent / serial:.1f}x")
        if not args.images:
            return
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            written = make_shards.main(
                [
                    f"gs://{BUCKET}/{PREFIX}",
                    f"gs://{BUCKET}/shards",
                    "--shard-size-mb",
                    str(args.shard_size_mb),
                ]
            )
        if written != 0:
            sys.exit("error: make_shards.py failed")
        shard_count = sum(b.name.endswith(".tar") for b in bucket.list_blobs(prefix="shards/"))
        print(
            f"loader, one process, {args.concurrency} requests in flight, batches of "
            f"{args.batch}, read + decode + both {args.crop_size}-px crops; shards: "
            f"{shard_count} of {args.shard_size_mb:g} MB"
        )
        per_image = loader_pass(f"gs://{BUCKET}/{PREFIX}", args, server)
        sharded = loader_pass(f"gs://{BUCKET}/shards/index.json", args, server)
        print(f"per-image objects: {per_image[0]:8.1f} images/s per loader process")
        print(f"shards:            {sharded[0]:8.1f} images/s per loader process")
        print(f"requests per 1000 images: per-image {per_image[1]:.0f}, shards {sharded[1]:.1f}")


if __name__ == "__main__":
    main()
