"""A run's curves: curves.png, for `model_def.py --plot` and `evaluate_result.py --pictures`.

Loss, learning rate, tau, representation spread, kNN and held-out accuracy against the step:
from a local run's TensorBoard files, or from the master's metrics of a trial on a cluster
(figures.py draws them).
"""

import logging
import math
import os
from typing import Dict, List, Optional, Tuple

from matplotlib.ticker import MaxNLocator, PercentFormatter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoint
from figures import checkpoint_line, new_figure, save, suptitle

Series = Dict[str, List[Tuple[int, float]]]  # metric name -> [(step, value)], by step


# Panels: (title, [(metric, legend label)]), metrics named as the trial reports them.
CURVES = [
    ("BYOL loss", [("loss", None)]),
    ("learning rate", [("learning_rate", None)]),
    ("EMA tau of the target network", [("tau", None)]),
    (
        "representation spread (std of the normalised projections; ~0 is collapse)",
        [("representation_std", None)],
    ),
]
ACCURACY = [
    ("holdout_accuracy", "linear probe, held-out images"),
    ("knn_accuracy", "kNN, test images"),
]
LABEL_FREE = [("validation_loss", "BYOL loss of fixed views of the validation images")]
# What BYOLTrial.train_batch returns: Determined's TensorBoard writer logs these per batch at the
# batch's index (steps_completed - len(batch_metrics) + i: 0 for the first step), the reducer's
# metrics at steps completed. One is added to the former so that both count steps completed.
BATCH_METRICS = ("learning_rate", "tau")


def tensorboard_series(folder: str) -> Series:
    """The scalars Determined's TensorBoard writer left in `folder` (its event files, all of
    them), named as the trial reports them: `Determined/loss` is loss, a validation's
    `Determined/val_knn_accuracy` is knn_accuracy. A step logged twice (a resumed run) keeps
    the later value, by the events' wall time: file names order files by the second they were
    opened and then by a counter, which does not sort as a number."""
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # a line per event file at INFO
    events = EventAccumulator(folder, size_guidance={"scalars": 0}).Reload()  # 0: keep all
    series: Series = {}
    for tag in events.Tags()["scalars"]:
        if not tag.startswith("Determined/"):
            continue
        name = tag[len("Determined/") :]
        name = name[len("val_") :] if name.startswith("val_") else name
        shift = 1 if name in BATCH_METRICS else 0
        latest = {
            e.step + shift: e.value for e in sorted(events.Scalars(tag), key=lambda e: e.wall_time)
        }
        series[name] = sorted(latest.items())
    return series


def master_series(sdk, trial_id: int) -> Series:
    """A trial's training and validation metrics as the master keeps them (the SDK's
    iter_trials_metrics; numbers only), by steps completed."""
    series: Series = {}
    for group in ("training", "validation"):
        for report in sdk.iter_trials_metrics([trial_id], group=group):
            for name, value in report.metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    series.setdefault(name, []).append((report.steps_completed, float(value)))
    return {name: sorted(points) for name, points in series.items()}


def validated_without_labels(series: Series) -> bool:
    """Whether the run's validations report the BYOL loss rather than the probe's accuracy."""
    return "validation_loss" in series and not any(name in series for name, _ in ACCURACY)


def draw_curves(path: str, series: Series, title: str, mark: Optional[Tuple[int, str]] = None):
    """curves.png: one panel per CURVES entry and one of the probe's accuracies (or, for a run
    that validated without labels, its validation loss); `mark` = (step, label) draws a dashed
    line at that step in every panel."""
    figure = new_figure(1200, 1000, dpi=100, layout="constrained")
    grid = figure.add_gridspec(3, 2)
    last = (
        ("validation loss (the run validated without labels)", LABEL_FREE)
        if validated_without_labels(series)
        else ("probe accuracy (validation)", ACCURACY)
    )
    axes = [figure.add_subplot(grid[0, 0])]
    axes += [figure.add_subplot(grid[i // 2, i % 2], sharex=axes[0]) for i in range(1, 4)]
    axes.append(figure.add_subplot(grid[2, :], sharex=axes[0]))
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps (shared by all panels)
    if last[1] is ACCURACY:
        axes[-1].set_ylim(-0.02, 1.04)  # 100% stays inside the frame
        axes[-1].yaxis.set_major_formatter(PercentFormatter(xmax=1))
    for ax, (panel, metrics) in zip(axes, CURVES + [last]):
        drawn = False
        for name, label in metrics:
            points = [(s, v) for s, v in series.get(name, []) if math.isfinite(v)]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(points) <= 30 else None, label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not reported", ha="center", va="center", transform=ax.transAxes)
        if mark is not None:
            ax.axvline(mark[0], linestyle="--", color="0.4", linewidth=1)
        if drawn and any(label for _, label in metrics):
            ax.legend(fontsize=8)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    suptitle(figure, [title] + ([f"dashed line: {mark[1]}"] if mark is not None else []), 11)
    return save(figure, path)


def _draw_run_curves(
    path: str,
    series: Series,
    title: str,
    mark: Optional[Tuple[int, str]] = None,
    say_why: bool = True,
) -> str:
    """curves.png, its path printed; a run that validated without labels says so first
    (unless `say_why` is false: the caller said it)."""
    if say_why and validated_without_labels(series):
        print(
            "no labelled test split in this run (it validated without labels, "
            "hyperparameters.validate_with_classifier=false): curves.png shows its validation "
            "loss instead of the kNN and held-out accuracy"
        )
    draw_curves(path, series, title, mark)
    print(f"wrote {path}")
    return path


def _run_title(folder: str) -> str:
    return f"Training curves of run {os.path.basename(folder)} (its TensorBoard files)"


def draw_tensorboard_curves(folder: str) -> str:
    """curves.png of a local run, into its TensorBoard folder (model_def.py --plot)."""
    path = os.path.join(folder, "curves.png")
    return _draw_run_curves(path, tensorboard_series(folder), _run_title(folder))


def draw_checkpoint_curves(
    ckpt: checkpoint.Checkpoint, directory: str, say_why: bool = True
) -> Optional[str]:
    """curves.png of the local run a checkpoint belongs to, its step marked; a checkpoint
    whose run's TensorBoard folder is unknown or gone gets one line saying so."""
    folder = checkpoint.run_tensorboard_folder(ckpt)
    if folder is None or not os.path.isdir(folder):
        where = (
            f"its run's TensorBoard folder {folder} is not there"
            if folder
            else "it names no TensorBoard folder of its run (a cluster's checkpoint: use "
            "--experiment-id; or one written before runs had their own folders)"
        )
        print(f"no curves.png for checkpoint {ckpt.uuid}: {where}")
        return None
    mark = (ckpt.steps_completed, checkpoint_line(ckpt))
    return _draw_run_curves(
        os.path.join(directory, "curves.png"),
        tensorboard_series(folder),
        _run_title(folder),
        mark,
        say_why,
    )


def draw_trial_curves(sdk, experiment_id: int, best, directory: str) -> str:
    """curves.png of the trial that wrote checkpoint `best` (an SDK Checkpoint), from the
    master's metrics, the checkpoint's step marked."""
    trial_id = best.training.trial_id
    title = (
        f"Training curves of experiment {experiment_id}, trial {trial_id} (the master's metrics)"
    )
    steps = best.metadata.get("steps_completed")
    mark = (steps, f"checkpoint {best.uuid} (step {steps})") if steps is not None else None
    return _draw_run_curves(
        os.path.join(directory, "curves.png"),
        master_series(sdk, trial_id),
        title,
        mark,
    )
