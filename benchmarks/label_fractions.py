"""What pretraining buys with few labels: test accuracy at label fractions (1%, 10%, 100% by
default) for a random-init backbone fine-tuned, the BYOL backbone's linear probe, and the BYOL
backbone fine-tuned, all through the real fine-tuning command (finetune.py) under the same budget.

    python benchmarks/label_fractions.py --checkpoint CKPT_DIR --output DIR
        [--fractions 0.01 0.1 1] [--epochs 30 30 10] [--lrs 0.05 0.2] [--set DOTTED.PATH=VALUE]

The data is the checkpoint's own (its config's data section and dataset_name), unless --set
changes it. Each cell trains once per learning rate of --lrs; the learning rate whose run has
the best accuracy on held-out training images (holdout_accuracy) is chosen, and that run's test
accuracy is the cell's. Nothing is chosen on the test split. The linear probe is the same trial
with the backbone frozen (backbone_lr_scale 0: eval mode, BatchNorm on running statistics).
Writes DIR/label_fractions.csv (every run, the chosen ones marked) and DIR/label_fractions.png.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Dict, List, NamedTuple, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import curves  # noqa: E402
import figures  # noqa: E402
import finetune  # noqa: E402
import utils  # noqa: E402
from config import (  # noqa: E402
    add_set_option,
    apply_override,
    load_config,
    parse_finetune_config,
    parse_hparams,
)
from data import build_splits  # noqa: E402

METHODS = {
    # name: (pretrained, backbone_lr_scale)
    "random init, fine-tuned": (False, 1.0),
    "BYOL, linear probe": (True, 0.0),
    "BYOL, fine-tuned": (True, 1.0),
}


class Run(NamedTuple):
    fraction: float
    method: str
    lr: float
    labeled_images: int
    holdout_accuracy: float
    test_accuracy: float
    seconds: float


def choose_by_holdout(runs: Sequence[Run]) -> Run:
    """The run with the best held-out accuracy (the first of a tie, in the order of --lrs)."""
    return max(runs, key=lambda run: run.holdout_accuracy)


def batch_size_for(labeled: int, largest: int) -> int:
    """The global batch: `largest`, or for a subset smaller than that the largest power of two
    it holds (an epoch is a whole number of batches)."""
    return min(largest, 2 ** int(math.log2(labeled)))


def subset_sizes(config: Dict[str, object], fractions: Sequence[float]) -> Dict[float, int]:
    """How many labeled images each fraction trains on, as the trial picks them."""
    finetune_config = parse_finetune_config(config)
    splits = build_splits(finetune_config.hparams.dataset_name, finetune_config.data)
    return {
        fraction: len(
            finetune.labeled_split(
                splits.labeled_train,
                dataclasses.replace(finetune_config.hparams, label_fraction=fraction),
                finetune_config.run.seed,
            )[0]
        )
        for fraction in fractions
    }


def fine_tune(
    directory: str, source: Dict[str, object], data: Dict[str, object], settings: Dict[str, object]
) -> Dict[str, float]:
    """One run of finetune.py (validated and checkpointed once, at its end) in `directory`;
    its last validation's metrics, read from its TensorBoard files."""
    overrides = [f"hyperparameters.pretrained.{k}={json.dumps(v)}" for k, v in source.items()]
    overrides += [f"data.{k}={json.dumps(v)}" for k, v in data.items()]
    overrides += [f"hyperparameters.{k}={json.dumps(v)}" for k, v in settings.items()]
    epochs = settings["epochs"]
    overrides += [
        f"min_validation_period={{epochs: {epochs}}}",
        f"min_checkpoint_period={{epochs: {epochs}}}",
        "scheduling_unit=10",
    ]
    argv = [os.path.join(ROOT, "finetune-cifar10.yaml"), "--checkpoint-dir", directory]
    finetune.main(argv + [a for o in overrides for a in ("--set", o)])
    (run,) = os.listdir(os.path.join(directory, "tensorboard"))
    series = curves.tensorboard_series(os.path.join(directory, "tensorboard", run))
    return {name: series[name][-1][1] for name in ("holdout_accuracy", "test_accuracy")}


def draw(path: str, chosen: List[Run], title: List[str]) -> str:
    figure = figures.new_figure(900, 560, 100)
    axes = figure.add_subplot(1, 1, 1)
    for method in METHODS:
        runs = sorted((r for r in chosen if r.method == method), key=lambda r: r.fraction)
        axes.plot(
            [100 * r.fraction for r in runs],
            [100 * r.test_accuracy for r in runs],
            marker="o",
            label=method,
        )
    axes.set_xscale("log")
    axes.set_xlabel("labeled training images used (%)")
    axes.set_ylabel("test accuracy (%)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figures.suptitle(figure, title, 10)
    return figures.save(figure, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a BYOL checkpoint directory")
    parser.add_argument("--output", required=True, help="where the CSV, picture and runs go")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument(
        "--epochs", type=int, nargs="+", default=[30, 30, 10], help="one per fraction"
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.2], help="base LRs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    add_set_option(parser, "data.train_dir=/path/train")
    args = parser.parse_args(argv)
    if len(args.epochs) != len(args.fractions):
        sys.exit(f"error: --epochs {args.epochs} needs one value per fraction {args.fractions}")
    ckpt_dir = checkpoint.check(args.checkpoint)
    stored = checkpoint.stored_config(ckpt_dir)
    byol = parse_hparams(stored["hyperparameters"])
    base = load_config(os.path.join(ROOT, "finetune-cifar10.yaml"))
    # The checkpoint's data, as far as fine-tuning reads it (not its unlabeled images).
    data = {k: v for k, v in (stored.get("data") or {}).items() if k in base["data"]}
    data["num_workers"] = args.workers
    for override in args.overrides:
        apply_override({"data": data}, override)
    output = utils.writable_directory(args.output, "--output")
    base["data"].update(data)
    base["hyperparameters"].update(dataset_name=byol.dataset_name, backbone_name=byol.backbone_name)
    sizes = subset_sizes(base, args.fractions)

    cells: Dict[Tuple[float, str], List[Run]] = {}  # (fraction, method): a run per LR
    for fraction, epochs in zip(args.fractions, args.epochs):
        for method, (uses_byol, backbone_lr_scale) in METHODS.items():
            for lr in args.lrs:
                source = {"checkpoint": ckpt_dir} if uses_byol else {}
                slug = method.replace(", ", "-").replace(" ", "-")
                directory = os.path.join(output, "runs", f"{fraction:g}-{slug}-{lr:g}")
                settings = {
                    "dataset_name": byol.dataset_name,
                    "backbone_name": byol.backbone_name,
                    "cifar_stem": byol.cifar_stem,
                    "image_size": byol.augmentation.image_size,
                    "label_fraction": fraction,
                    "epochs": epochs,
                    "learning_rate": lr,
                    "backbone_lr_scale": backbone_lr_scale,
                    "global_batch_size": batch_size_for(sizes[fraction], args.batch_size),
                }
                started = time.time()
                metrics = fine_tune(directory, source, data, settings)
                run = Run(
                    fraction,
                    method,
                    lr,
                    sizes[fraction],
                    metrics["holdout_accuracy"],
                    metrics["test_accuracy"],
                    round(time.time() - started, 1),
                )
                print(run, flush=True)
                cells.setdefault((fraction, method), []).append(run)

    chosen = [choose_by_holdout(runs) for runs in cells.values()]
    figures.write_csv(
        os.path.join(output, "label_fractions.csv"),
        list(Run._fields) + ["chosen"],
        [list(r) + [r in chosen] for runs in cells.values() for r in runs],
    )
    title = [
        f"{byol.backbone_name} on {byol.dataset_name}, BYOL checkpoint {os.path.basename(ckpt_dir)}",
        f"LR of {args.lrs} chosen on held-out images; epochs {args.epochs} for {args.fractions}",
    ]
    draw(os.path.join(output, "label_fractions.png"), chosen, title)
    rows = [
        [
            f"{100 * r.fraction:g}% ({r.labeled_images})",
            r.method,
            f"{100 * r.test_accuracy:.1f}%",
            f"{100 * r.holdout_accuracy:.1f}%",
            f"{r.lr:g}",
            f"{sum(x.seconds for x in cells[r.fraction, r.method]):.0f} s",
        ]
        for r in chosen
    ]
    print(
        utils.format_table(
            rows, ["labels", "method", "test acc.", "held-out acc.", "chosen LR", "time (all LRs)"]
        )
    )


if __name__ == "__main__":
    main()
