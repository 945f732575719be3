"""The GPU figures of issue 19's goals, in one run, ready as it is for one GPU (an H200):

    python benchmarks/gpu.py                           # ResNet-18, 512 CIFAR-size images, bf16
    python benchmarks/gpu.py --device cpu --smoke      # every code path, tiny: is it broken?

With compile off and on (hyperparameters.compile), on the trial built from const-cifar10.yaml:
1. augmentation: ms per two-view call on 512 uint8 CIFAR arrays (goal on an H200: <= 1 ms);
2. training step: BYOLTrial.train_batch (augmentation on the device, non-finite guard, LARS,
   EMA) against a bare eager loop over the same networks and LARS with the views given
   (goal: <= 1.0x with compile); also train_batch with the views given, to separate the two;
3. a CIFAR-10-size epoch: 50,000 images through train_batch from pinned uint8 batches (the
   loader's decoding is not in it);
4. validation: images/s of evaluate_batch (features + probe update) against training's.
Timings wait for the device (torch.cuda.synchronize) and report medians.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import device  # noqa: E402
import utils  # noqa: E402
from benchmarks import speed  # noqa: E402

CIFAR10_IMAGES = 50_000


def median_ms(fn, repeats, sync, warmup=2):
    return speed.interleaved({"fn": fn}, repeats, warmup, sync)["fn"] * 1000


def measure(trial, size, batch_size, epoch_images, repeats, sync):
    """{measure: value} for one trial (one compile setting)."""
    to_device = lambda b: {k: v.to(trial.device, non_blocking=True) for k, v in b.items()}
    pinned = lambda b: {k: v.pin_memory() if trial.on_cuda else v for k, v in b.items()}
    batch = pinned(speed.device_batch(batch_size, size))
    on_device = to_device(batch)
    step = [0]

    def train_step(b):
        trial.context._current_batch_idx = step[0]  # what Determined's training loop sets
        trial.train_batch(b, 0, step[0])
        step[0] += 1

    out = {}
    augment = lambda: trial.augment_here(on_device["image"], on_device["key"])
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


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: check that every code path runs"
    )
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both")
    args = parser.parse_args()
    on_gpu, sync = speed.use_device(parser, args.device)
    batch_size, epoch_images, repeats = (8, 16, 2) if args.smoke else (512, CIFAR10_IMAGES, 20)
    settings = {"off": ["false"], "on": ["true"], "both": ["false", "true"]}[args.compile]
    where = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"torch {torch.__version__}, {where}, batch {batch_size} x 32 px")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The trial needs a dataset to build: enough 32-px images for one batch.
        speed.write_folder(tmp, per_class=max(2, batch_size // 4 + 1), test_per_class=2)
        for setting in settings:
            os.environ["XDG_DATA_HOME"] = os.path.join(tmp, f"ckpt-{setting}")
            overrides = [
                "hyperparameters.dataset_name=image_folder",
                f"data.train_dir={tmp}/train",
                f"data.test_dir={tmp}/test",
                f"hyperparameters.global_batch_size={batch_size}",
                "hyperparameters.augment_on=device",
                f"hyperparameters.compile={setting}",
                "data.num_workers=0",
            ]
            if args.smoke:  # small heads: the code paths, not the sizes
                overrides += [
                    "hyperparameters.projector_hidden_dim=64",
                    "hyperparameters.projection_dim=32",
                ]
            config = os.path.join(ROOT, "const-cifar10.yaml")
            with speed.local_trial(config, overrides) as trial:
                start = time.perf_counter()
                results[f"compile {setting}"] = measure(
                    trial, 32, batch_size, epoch_images, repeats, sync
                )
                print(f"compile {setting}: measured in {time.perf_counter() - start:.0f} s")

    names = list(next(iter(results.values())))
    rows = [[name] + [f"{r[name]:.3f}" for r in results.values()] for name in names]
    print(utils.format_table(rows, ["measure"] + list(results)))


if __name__ == "__main__":
    main()
