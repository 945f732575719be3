"""The GPU figures of issue 33's goals, in one run on one GPU (about 5 minutes on an H100-class
card), printed as a table and written to one JSON file:

    python benchmarks/gpu.py --json gpu.json          # on a GPU: ResNet-18 CIFAR + ResNet-50 224 px
    python benchmarks/gpu.py --device cpu --smoke     # every code path, tiny (the suite runs it)

The goals: augmentation <= 1 ms a call (512 CIFAR images), the compiled train_batch <= 1.0x a
bare eager loop, GPU JPEG decoding >= 5,000 images/s.

With compile off and on (hyperparameters.compile), on the trial built from const-cifar10.yaml
(ResNet-18, CIFAR stem, 512 images of 32 px, bf16 on a GPU):
1. augmentation: ms per two-view call on the uint8 arrays;
2. training step: BYOLTrial.train_batch (augmentation on the device, non-finite guard, LARS,
   EMA) against a bare eager loop over the same networks and LARS with the views given (both
   views in one forward, the EMA one fused multi-tensor op: speed.bare_step_fn); also
   train_batch with the views given, to separate the two;
3. a CIFAR-10-size epoch: 50,000 images through train_batch from pinned uint8 batches (the
   loader's decoding is not in it);
4. validation: images/s of evaluate_batch (features + probe update);
5. peak memory of two training steps, measured (torch.cuda.max_memory_allocated; the CPU has no
   such counter) against memory.py's estimate made without a GPU;
6. with compile on: dynamo's graphs, graph breaks and recompiles (its own counters).
Then at ImageNet size, on the trial built from distributed-imagenet.yaml (ResNet-50, 224 px, its
per-GPU batch of 64):
7. train_batch images/s from the loader's CPU-decoded uint8 crops, and from JPEG bytes that the
   step decodes on the device (data.decode_on: gpu; the loader's own batch of 300x400
   photograph-like JPEGs), and the peak memory of two steps against the estimate;
8. JPEG decoding of those JPEGs (quality 90): PIL on one CPU core (what each loader core does
   today, crops aside) and the package's batched decode on the device (device_decode.decode_all:
   nvJPEG on a GPU), and how its pixels differ from libjpeg-turbo's on the CPU.
Timings wait for the device (torch.cuda.synchronize) and report medians.
"""

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import device  # noqa: E402
import device_decode  # noqa: E402
import memory  # noqa: E402
import sources  # noqa: E402
import utils  # noqa: E402
from benchmarks import speed  # noqa: E402
from config import parse_data_config  # noqa: E402

CIFAR10_IMAGES = 50_000
GOALS = {
    "augmentation ms": "<= 1 ms",
    "train_batch / bare": "<= 1.0x compiled",
    "GPU JPEG decode images/s": ">= 5000",
}


def median_ms(fn, repeats, sync, warmup=2):
    return speed.interleaved({"fn": fn}, repeats, warmup, sync)["fn"] * 1000


def pinned(trial, batch):
    on_gpu = trial.device.type == "cuda"
    return {k: v.pin_memory() if on_gpu else v for k, v in batch.items()}


def peak_memory(trial, batch, train_step, sync):
    """(measured peak bytes of two steps, or None off a GPU; memory.py's estimate)."""
    estimate = memory.step_peak_bytes(trial.hp, len(batch["key"]), trial.autocast_dtype)
    if trial.device.type != "cuda":
        return None, estimate
    sync()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        train_step(batch)
    sync()
    return torch.cuda.max_memory_allocated(), estimate


def measure_cifar(trial, batch_size, epoch_images, repeats, sync):
    """{measure: value} of the CIFAR-size trial (one compile setting)."""
    batch = pinned(trial, speed.device_batch(batch_size, 32))
    on_device = {k: v.to(trial.device, non_blocking=True) for k, v in batch.items()}
    train_step = speed.train_steps(trial)

    out = {}

    def augment():
        with torch.no_grad():  # as two_views makes them: one compiled graph for both
            return trial.augment_here(on_device["image"], on_device["key"])

    out["augmentation ms"] = median_ms(augment, repeats, sync)

    views = device.memory_format(augment(), trial.channels_last)
    with_views = {"views": views, "key": on_device["key"], "corrupt": on_device["corrupt"]}
    bare = speed.bare_step_fn(trial)
    out["train_batch ms"] = median_ms(lambda: train_step(batch), repeats, sync)
    out["train_batch, views given, ms"] = median_ms(lambda: train_step(with_views), repeats, sync)
    out["bare eager step ms"] = median_ms(
        lambda: bare(views[:batch_size], views[batch_size:]), repeats, sync
    )
    out["train_batch / bare"] = out["train_batch ms"] / out["bare eager step ms"]
    out["training images/s"] = batch_size / out["train_batch ms"] * 1000

    steps = epoch_images // batch_size
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(batch)
    sync()
    out[f"epoch of {steps * batch_size} images, s"] = time.perf_counter() - start
    trial.divergence.check_finite()

    measured, estimate = peak_memory(trial, batch, train_step, sync)
    out["peak memory measured, GiB"] = None if measured is None else measured / 2**30
    out["peak memory estimated, GiB"] = estimate / 2**30

    labeled = {
        "image": batch["image"],
        "label": torch.arange(batch_size) % 10,
        "split": torch.zeros(batch_size, dtype=torch.long),
        "index": torch.arange(batch_size),
        "valid": torch.ones(batch_size, dtype=torch.bool),
    }
    trial.network.eval()
    trial.probe.reset()
    with torch.no_grad():
        validation_ms = median_ms(lambda: trial.evaluate_batch(labeled, 0), repeats, sync)
    trial.network.train()
    out["validation images/s"] = batch_size / validation_ms * 1000
    return out


def measure_imagenet(trial, batch_size, jpeg_folder, repeats, sync):
    """train_batch images/s at 224 px from what the loader ships: the CPU-decoded crops
    ([B, 2, 3, S, S] uint8), or the JPEG bytes and boxes that the step decodes on the device
    (data.decode_on: gpu; the loader's own batch of the JPEGs in `jpeg_folder`)."""
    size = trial.augment.size
    batch = speed.device_batch(batch_size, size)
    views = torch.stack([batch["image"], batch["image"].flip(-1)], dim=1)
    batch = pinned(trial, dict(batch, image=views))
    train_step = speed.train_steps(trial)
    step_ms = median_ms(lambda: train_step(batch), repeats, sync)
    trial.divergence.check_finite()
    measured, estimate = peak_memory(trial, batch, train_step, sync)

    config = parse_data_config({})
    jpegs = sources.open_folder(jpeg_folder, None, config, sources.run_here)
    log = data.CorruptImageLog(strict=True)
    loader = data.TrainImages(jpegs, trial.augment, 0, log, decode_on_device=True)
    jpeg_batch = loader.collate(loader.__getitems__([(i, 0) for i in range(batch_size)]))
    assert len(jpeg_batch["jpeg_rows"]) == batch_size  # every image decoded in the step
    decoding_ms = median_ms(lambda: train_step(jpeg_batch), repeats, sync)
    trial.divergence.check_finite()
    rate = lambda ms: batch_size / ms * 1000
    return {
        "ImageNet-size train_batch images/s, CPU-decoded crops given": rate(step_ms),
        "ImageNet-size train_batch images/s, JPEGs decoded in the step": rate(decoding_ms),
        "ImageNet-size peak memory measured, GiB": None if measured is None else measured / 2**30,
        "ImageNet-size peak memory estimated, GiB": estimate / 2**30,
    }


def write_jpegs(folder, blobs):
    os.makedirs(os.path.join(folder, "c0"))
    for i, blob in enumerate(blobs):
        with open(os.path.join(folder, "c0", f"{i:04d}.jpg"), "wb") as f:
            f.write(blob)
    return folder


def photograph_like_jpegs(count, height=300, width=400, seed=0):
    """JPEG bytes (quality 90) of smooth random images with some texture: their size and
    entropy are a photograph's, unlike noise (which JPEG cannot compress) or flat colour."""
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(count):
        coarse = rng.integers(0, 255, (height // 20, width // 20, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image, np.int16) + rng.integers(-12, 12, (height, width, 3))
        out = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
        blobs.append(out.getvalue())
    return blobs


def measure_decoding(blobs, target, repeats, sync):
    """{measure: value}: images/s of PIL's decode on one core and of the package's batched
    decode on `target` (device_decode.decode_all: one decode_jpeg call where this torchvision
    takes a list, one a image before 0.19), and how its pixels differ from libjpeg-turbo's on
    the CPU (nvJPEG's IDCT against it, on a GPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def pil():
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as image:
                image.convert("RGB").load()

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        torchvision.io.decode_jpeg(tensors[:2], device=target)
        how = "batched"
    except (TypeError, RuntimeError):  # no list input in this torchvision
        how = "one call per image"
    medians = speed.interleaved(
        {"pil": pil, "device": lambda: device_decode.decode_all(tensors, target)},
        repeats,
        sync=sync,
    )
    torch.set_num_threads(threads)
    on_device = device_decode.decode_all(tensors, target)
    differences = [
        (image.cpu().int() - torchvision.io.decode_jpeg(t, mode=ImageReadMode.RGB).int()).abs()
        for image, t in zip(on_device, tensors)
    ]
    label = "GPU" if target.type == "cuda" else "CPU"
    return {
        "PIL JPEG decode images/s, 1 core": len(blobs) / medians["pil"],
        f"{label} JPEG decode images/s": len(blobs) / medians["device"],
        f"{label} JPEG decode calls": how,
        f"{label} decode vs CPU libjpeg-turbo, mean |difference|": float(
            torch.cat([d.flatten() for d in differences]).float().mean()
        ),
        f"{label} decode vs CPU libjpeg-turbo, largest |difference|": int(
            max(int(d.max()) for d in differences)
        ),
    }


def dynamo_counts():
    counters = torch._dynamo.utils.counters
    return {
        "dynamo graphs": counters["stats"].get("unique_graphs", 0),
        "dynamo graph breaks": sum(counters["graph_break"].values()),
        "dynamo recompiles": sum(counters["recompiles"].values()),
    }


def trial_overrides(tmp, batch_size, compile_setting, smoke):
    overrides = [
        "hyperparameters.dataset_name=image_folder",
        f"data.train_dir={tmp}/train",
        f"data.test_dir={tmp}/test",
        f"hyperparameters.global_batch_size={batch_size}",
        "hyperparameters.augment_on=device",
        f"hyperparameters.compile={compile_setting}",
        "data.num_workers=0",
        "resources.slots_per_trial=1",
    ]
    if smoke:  # small heads: the code paths, not the sizes
        overrides += [
            "hyperparameters.projector_hidden_dim=64",
            "hyperparameters.projection_dim=32",
        ]
    return overrides


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: check that every code path runs"
    )
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both")
    parser.add_argument(
        "--backend",
        default=None,
        help="torch.compile's backend (default inductor; --smoke: eager, since dynamo alone "
        "decides graphs, breaks and recompiles)",
    )
    parser.add_argument("--json", default="gpu.json", help="where the results go")
    args = parser.parse_args()
    on_gpu, sync = speed.use_device(parser, args.device)
    backend = args.backend or ("eager" if args.smoke else "inductor")
    if backend != "inductor":
        real_compile = torch.compile
        torch.compile = lambda fn, **kw: real_compile(fn, **dict(kw, backend=backend))
    sizes = (8, 16, 2, 4, 8) if args.smoke else (512, CIFAR10_IMAGES, 20, 64, 256)
    batch_size, epoch_images, repeats, imagenet_batch, jpegs = sizes
    settings = {"off": ["false"], "on": ["true"], "both": ["false", "true"]}[args.compile]
    where = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {where}")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The trials need a dataset to build: enough 32-px images for one batch.
        speed.write_folder(tmp, per_class=max(2, max(batch_size, imagenet_batch) // 4 + 1))
        blobs = photograph_like_jpegs(max(jpegs, imagenet_batch))
        jpeg_folder = write_jpegs(os.path.join(tmp, "jpegs"), blobs[:imagenet_batch])
        for setting in settings:
            os.environ["XDG_DATA_HOME"] = os.path.join(tmp, f"ckpt-{setting}")
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            column = results.setdefault(f"compile {setting}", {})
            start = time.perf_counter()
            cifar = os.path.join(ROOT, "const-cifar10.yaml")
            overrides = trial_overrides(tmp, batch_size, setting, args.smoke)
            with speed.local_trial(cifar, overrides) as trial:
                column.update(measure_cifar(trial, batch_size, epoch_images, repeats, sync))
            imagenet = os.path.join(ROOT, "distributed-imagenet.yaml")
            overrides = trial_overrides(tmp, imagenet_batch, setting, args.smoke)
            if args.smoke:
                overrides += ["hyperparameters.augmentation.image_size=64"]
            with speed.local_trial(imagenet, overrides) as trial:
                column.update(measure_imagenet(trial, imagenet_batch, jpeg_folder, repeats, sync))
            if setting == "true":
                column.update(dynamo_counts())
            print(f"compile {setting}: measured in {time.perf_counter() - start:.0f} s")
        decoding = measure_decoding(blobs[:jpegs], torch.device(args.device), repeats, sync)

    names = list(dict.fromkeys(name for column in results.values() for name in column))
    show = lambda v: "" if v is None else v if isinstance(v, str) else f"{v:.3f}"
    rows = [[name] + [show(c.get(name)) for c in results.values()] for name in names]
    print(utils.format_table(rows, ["measure"] + list(results)))
    for name, value in decoding.items():
        print(f"{name}: {show(value)}")
    record = {
        "device": where,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "compile backend": backend,
        "goals": GOALS,
        "results": results,
        "decoding": decoding,
    }
    with utils.atomic_write(args.json) as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
