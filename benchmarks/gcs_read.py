"""Images/s read through GCSFiles.read_many with 1 request in flight versus the default
concurrency, against the GCS emulator on 127.0.0.1.

    .venv/bin/python benchmarks/gcs_read.py [--count 512] [--size 64] [--latency-ms 20]
                                            [--images DIR] [--batch 256] [--concurrency 16]

A loopback emulator answers in well under a millisecond, where a real bucket takes tens of
milliseconds per request; so a proxy in front of it adds --latency-ms to every request (0 turns
it off). Server and proxy run in a child process, so they do not compete with the reading
threads for one GIL. The emulator serves one request at a time, which caps the concurrent
figure; a real bucket serves many at once. Only bytes are fetched: no decoding, no cache.
"""

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from gcs_server import FakeGCSProcess  # noqa: E402

# `data` and `gcs` (and torch with them) are imported in main(): the server's child process
# re-imports this file and needs none of it.
data = gcs = None

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
        if f.lower().endswith(data.IMAGE_EXTENSIONS)
    )[:count]
    if not names:
        sys.exit(f"error: no images under {directory}")
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            yield name.replace(os.sep, "/"), f.read()


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
    global data, gcs
    import data
    import gcs

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


if __name__ == "__main__":
    main()
