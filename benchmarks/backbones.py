"""The backbone families side by side at 32 px: size, compute, CPU speed, what a GPU would
launch, and what a short BYOL budget buys, all through the package's own trial.

    python benchmarks/backbones.py IMAGE_FOLDER [--names resnet18 convnext_tiny vit_ti_16]
        [--epochs 3] [--batch 128] [--repeats 5]

IMAGE_FOLDER holds train/<class>/ and test/<class>/ (e.g. ../shared/data/cifar10-subset).
Every backbone gets its small-image adaptation (cifar_stem: true) and its family's optimizer
(LARS for convolutional networks at base LR 1.0, AdamW for transformers at DINO's 5e-4 and
weight decay 0.04), the rest of const-cifar10.yaml as it is, and per backbone:

1. parameters of the backbone, and its forward FLOPs per 32-px image (torch's FlopCounterMode,
   2 FLOPs a multiply-add);
2. kernel launches and host syncs of one training step (benchmarks/op_count.py; counted on the
   CPU, eager);
3. CPU training images/s: train_batch timed with the backbones interleaved (A B C A B C ...),
   the median of --repeats, so drift of a shared machine hits all alike;
4. the linear probe and kNN of the last validation after --epochs of BYOL on IMAGE_FOLDER (the
   real command; the probe's LR chosen on held-out training images, test accuracy reported);
   --epochs 0 leaves this out.
"""

import argparse
import ast
import contextlib
import logging
import os
import re
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import backbone  # noqa: E402
import model_def  # noqa: E402
from benchmarks.speed import count_step, device_batch, local_trial  # noqa: E402

SIZE = 32
RECIPE = {  # family kind -> (optimizer settings): the package's defaults for each
    True: ["hyperparameters.learning_rate=1.0"],
    False: ["hyperparameters.learning_rate=0.0005", "hyperparameters.weight_decay=0.04"],
}


def overrides(name, folder, batch):
    return [
        f"hyperparameters.backbone_name={name}",
        "hyperparameters.cifar_stem=true",
        "hyperparameters.dataset_name=image_folder",
        f"data.train_dir={folder}/train",
        f"data.test_dir={folder}/test",
        f"hyperparameters.global_batch_size={batch}",
        "hyperparameters.compile=false",  # eager: the ops counted are the ops launched
        *RECIPE[backbone.is_convolutional(name)],
    ]


def size_and_flops(name):
    net, _ = backbone.build_backbone(name, True, SIZE)
    params = sum(p.numel() for p in net.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net.eval()(torch.zeros(1, 3, SIZE, SIZE))
    return params, counter.get_total_flops()


class ValidationLog(logging.Handler):
    """The metrics of each report_validation_metrics line Determined logs."""

    def __init__(self):
        super().__init__()
        self.reports = []

    def emit(self, record):
        found = re.search(
            r"report_validation_metrics\(steps_completed=(\d+), metrics=(\{.*\})\)",
            record.getMessage(),
        )
        if found:
            self.reports.append((int(found.group(1)), ast.literal_eval(found.group(2))))


def short_budget(name, folder, batch, epochs, out):
    """The real training command for `epochs`, validated once at the end."""
    sets = overrides(name, folder, batch) + [
        f"hyperparameters.epochs={epochs}",
        "hyperparameters.warmup_epochs=1",
        "data.num_workers=1",
        f"min_validation_period={{epochs: {epochs}}}",
        f"min_checkpoint_period={{epochs: {epochs}}}",
        "scheduling_unit=20",
    ]
    log = ValidationLog()
    logging.getLogger("determined.core").addHandler(log)
    start = time.time()
    try:
        args = [os.path.join(ROOT, "const-cifar10.yaml"), "--checkpoint-dir", out]
        for s in sets:
            args += ["--set", s]
        model_def.main(args)
    finally:
        logging.getLogger("determined.core").removeHandler(log)
    return log.reports[-1][1], time.time() - start


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder")
    parser.add_argument("--names", nargs="+", default=["resnet18", "convnext_tiny", "vit_ti_16"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU figures only
    folder = os.path.abspath(args.folder)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {SIZE} px")

    rows = {name: dict(zip(("params", "flops"), size_and_flops(name))) for name in args.names}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        os.environ["XDG_DATA_HOME"] = os.path.join(tmp, "ckpt")
        timed_batch = 32
        trials = {}
        for name in args.names:
            trial = stack.enter_context(
                local_trial(
                    os.path.join(ROOT, "const-cifar10.yaml"), overrides(name, folder, timed_batch)
                )
            )
            batch = device_batch(timed_batch, SIZE)
            for step in range(2):  # the second step: the first copies constants once
                counter = count_step(trial, batch, step)
            rows[name].update(
                launches=counter.launches(), syncs=counter.syncs(), optimizer=trial.hp.optimizer
            )
            trials[name] = (trial, batch)
        times = {name: [] for name in args.names}
        for repeat in range(args.repeats + 1):
            for name, (trial, batch) in trials.items():
                start = time.perf_counter()
                trial.context._current_batch_idx = 2 + repeat
                trial.train_batch(batch, 0, 2 + repeat)
                if repeat:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
        for name in args.names:
            rows[name]["images_per_s"] = timed_batch / statistics.median(times[name])
    for name in args.names if args.epochs else []:
        with tempfile.TemporaryDirectory() as out:
            metrics, seconds = short_budget(name, folder, args.batch, args.epochs, out)
        rows[name].update(
            holdout=metrics["holdout_accuracy"],
            test=metrics["test_accuracy"],
            knn=metrics["knn_accuracy"],
            minutes=seconds / 60,
        )

    print(
        f"\n| backbone (cifar_stem) | optimizer | parameters | GFLOPs / image | launches / step "
        f"(syncs) | CPU training images/s | probe held-out / test, kNN, after {args.epochs} epochs "
        f"| minutes |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        probe = (
            f"{100 * r['holdout']:.1f}% / {100 * r['test']:.1f}%, {100 * r['knn']:.1f}% | "
            f"{r['minutes']:.1f}"
            if args.epochs
            else "| "
        )
        print(
            f"| {name} | {r['optimizer']} | {r['params'] / 1e6:.2f} M | {r['flops'] / 1e9:.3f} | "
            f"{r['launches']} ({r['syncs']}) | {r['images_per_s']:.1f} | {probe} |"
        )


if __name__ == "__main__":
    main()
