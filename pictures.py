"""Pictures of what a backbone learned and of how its run went, for `evaluate_result.py
--pictures DIR` and `model_def.py --plot`. Drawn with matplotlib's Agg renderer on Figure
objects (no pyplot, no display, no global state); only this module imports matplotlib, so
training never pays for it.

  neighbours.png  QUERIES test images chosen with the run's seed, each followed by its NEIGHBOURS
                  most cosine-similar labelled training images, on the features and with the
                  similarity of the kNN accuracy (probe.cosine_neighbours); each neighbour is
                  framed by whether its class is the query's. neighbours.csv names them.
  confusion.png   the confusion matrix, on the test images, of the linear classifier whose test
                  accuracy the evaluation reports (its LR chosen on held-out images),
                  row-normalised; per_class.csv holds each class's accuracy.
  embedding.png   the test features on their first two principal components, coloured by class.
  curves.png      loss, learning rate, tau, representation spread, kNN and held-out accuracy
                  against the step: from a local run's TensorBoard files, or from the master's
                  metrics of a trial on a cluster.

Small images (CIFAR's 32 px) are magnified by a whole factor without smoothing, so every pixel
shown is one the backbone saw. Data without labels (fewer than 2 classes: a label-free run's)
gets the neighbours and the embedding without classes, and no confusion matrix.
"""

import csv
import logging
import math
import os
import textwrap
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoint
import data
import sources
import utils
from linear_eval import Evaluation, SplitFeatures, knn_bank
from probe import SPLIT_TEST, cosine_neighbours

QUERIES = 16
NEIGHBOURS = 8
EMBEDDED = 5000  # test images at most in embedding.png (a seeded choice beyond that)

# Colour-blind-safe frames (Okabe and Ito's palette): same class, another class, no labels.
SAME_CLASS = (0, 114, 178)
OTHER_CLASS = (213, 94, 0)
NO_CLASS = (160, 160, 160)
QUERY_FRAME = (40, 40, 40)

Series = Dict[str, List[Tuple[int, float]]]  # metric name -> [(step, value)], by step


def _new_figure(width_px: int, height_px: int, dpi: int, layout: Optional[str] = None) -> Figure:
    """A Figure of exactly width x height pixels, drawn by Agg."""
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str) -> str:
    """The PNG written whole or not at all (utils.atomic_write), at the figure's own size."""
    with utils.atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=figure.dpi, facecolor="white")
    return path


def _wrapped(lines: Sequence[str], width_px: int, fontsize: float, dpi: int) -> List[str]:
    """Title lines broken to fit `width_px` (DejaVu Sans is about 0.6 em wide a character)."""
    characters = int(width_px / (0.6 * fontsize * dpi / 72))
    return [part for line in lines for part in textwrap.wrap(line, characters)]


def _suptitle(figure: Figure, lines: Sequence[str], fontsize: float) -> None:
    figure.suptitle(
        "\n".join(_wrapped(lines, figure.bbox.width, fontsize, figure.dpi)), fontsize=fontsize
    )


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A CSV file written whole or not at all, one line per row."""
    with utils.atomic_write(path) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _checkpoint_line(ckpt: checkpoint.Checkpoint) -> str:
    return f"checkpoint {ckpt.uuid} (step {ckpt.steps_completed})"


# ------------------------------------------------------------------------------------------
# Nearest neighbours: neighbours.png and neighbours.csv
# ------------------------------------------------------------------------------------------


def choose_queries(count: int, seed: int) -> np.ndarray:
    """QUERIES of `count` test rows (all of them when fewer), drawn with `seed`, in row order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=min(QUERIES, count), replace=False))


class NeighbourTable(NamedTuple):
    queries: np.ndarray  # [Q] rows of the test split's features
    neighbours: np.ndarray  # [Q, K] rows of linear_eval.knn_bank(), most similar first
    similarities: np.ndarray  # [Q, K] cosine similarities


def nearest_training_images(features: Dict[int, SplitFeatures], seed: int) -> NeighbourTable:
    """Each chosen test image's NEIGHBOURS most cosine-similar training images."""
    test = features[SPLIT_TEST].features
    queries = choose_queries(len(test), seed)
    similarities, rows = cosine_neighbours(
        knn_bank(features).features, test[torch.from_numpy(queries)], NEIGHBOURS
    )
    return NeighbourTable(queries, rows.numpy(), similarities.numpy())


def shown(image: np.ndarray) -> np.ndarray:
    """An [S, S, 3] crop as neighbours.png shows it: up to 128 px magnified by the whole factor
    that makes it at least 96 px, each pixel a block (no smoothing: nothing is invented);
    larger ones reduced to 128 px."""
    size = image.shape[0]
    if size <= 128:
        factor = math.ceil(96 / size)
        return image.repeat(factor, axis=0).repeat(factor, axis=1)
    return np.asarray(Image.fromarray(image).resize((128, 128), Image.LANCZOS))


class NeighbourGrid(NamedTuple):
    """Where neighbours.png puts things, in pixels from its top left: one row per query, the
    query in column 0 and its neighbours in columns 1..K, each image inside a coloured frame
    with two lines of text below."""

    image_px: int  # side of a shown image
    rows: int
    columns: int
    title_lines: int

    MARGIN = 16
    TITLE_LINE = 22
    FRAME = 5
    LABEL = 34  # two lines of text under a frame
    ROW_GAP = 10
    COLUMN_GAP = 8
    QUERY_GAP = 28  # between the query and its first neighbour

    @property
    def cell(self) -> int:
        return self.image_px + 2 * self.FRAME

    def frame_origin(self, row: int, column: int) -> Tuple[int, int]:
        """(x, y) of the frame's top-left pixel."""
        x = self.MARGIN
        if column > 0:
            x += self.cell + self.QUERY_GAP + (column - 1) * (self.cell + self.COLUMN_GAP)
        header = 2 * self.MARGIN + self.title_lines * self.TITLE_LINE
        return x, header + row * (self.cell + self.LABEL + self.ROW_GAP)

    def image_origin(self, row: int, column: int) -> Tuple[int, int]:
        x, y = self.frame_origin(row, column)
        return x + self.FRAME, y + self.FRAME

    def size(self) -> Tuple[int, int]:
        x, y = self.frame_origin(self.rows, self.columns - 1)
        return x + self.cell + self.MARGIN, y - self.ROW_GAP + self.MARGIN


def _short(name: str, length: int) -> str:
    return name if len(name) <= length else name[: length - 1] + "…"


def draw_neighbours(
    path: str,
    queries: np.ndarray,
    neighbours: np.ndarray,
    query_classes: Sequence[str],
    neighbour_classes: Sequence[Sequence[str]],
    similarities: np.ndarray,
    same_class: Optional[np.ndarray],
    title: Sequence[str],
) -> str:
    """neighbours.png from uint8 crops: queries [Q, S, S, 3], neighbours [Q, K, S, S, 3];
    `same_class` [Q, K] colours the frames (None: data without labels, grey frames). The
    images are pasted pixel for pixel (figimage, no resampling); the text is matplotlib's."""
    image_px, columns = shown(queries[0]).shape[0], 1 + neighbours.shape[1]
    width = NeighbourGrid(image_px, len(queries), columns, 0).size()[0]
    title = _wrapped(title, width - 2 * NeighbourGrid.MARGIN, 8, 128)
    grid = NeighbourGrid(image_px, len(queries), columns, len(title))
    width, height = grid.size()
    canvas = np.full((height, width, 3), 255, np.uint8)
    figure = _new_figure(width, height, dpi=128)  # a power of two: pixel sizes stay exact

    def paste(row: int, column: int, image: np.ndarray, frame, lines: Sequence[str], colour):
        x, y = grid.frame_origin(row, column)
        canvas[y : y + grid.cell, x : x + grid.cell] = frame
        ix, iy = grid.image_origin(row, column)
        canvas[iy : iy + grid.image_px, ix : ix + grid.image_px] = shown(image)
        for i, (line, tint) in enumerate(zip(lines, colour)):
            figure.text(
                (x + grid.cell / 2) / width,
                1 - (y + grid.cell + 3 + 15 * i) / height,
                _short(line, max(8, grid.cell // 7)),
                ha="center",
                va="top",
                fontsize=7.5,
                color=tint,
            )

    for row, query in enumerate(queries):
        paste(row, 0, query, QUERY_FRAME, ["query", query_classes[row]], ["black", "black"])
        for k in range(neighbours.shape[1]):
            if same_class is None:
                frame, tint = NO_CLASS, "black"
            else:
                frame = SAME_CLASS if same_class[row, k] else OTHER_CLASS
                tint = tuple(c / 255 for c in frame)  # the class name in its frame's colour
            lines = [neighbour_classes[row][k], f"cos {similarities[row, k]:.3f}"]
            paste(row, k + 1, neighbours[row, k], frame, lines, [tint, "black"])
    figure.figimage(canvas, 0, 0, origin="upper")
    for i, line in enumerate(title):
        figure.text(
            grid.MARGIN / width,
            1 - (grid.MARGIN + grid.TITLE_LINE * i) / height,
            line,
            ha="left",
            va="top",
            fontsize=8,
        )
    return _save(figure, path)


def image_name(parts: Sequence[Tuple[object, int]], index: int) -> str:
    """Where a user finds image `index` of data.EvalImages(parts): its file (a shard's member),
    or its number in the dataset's array (CIFAR-10, STL-10)."""
    for source, _ in parts:
        if index < len(source):
            break
        index -= len(source)
    while isinstance(source, sources.Subset):
        source, index = source.source, int(source.indices[index])
    if hasattr(source, "member_name"):  # a shard set: shard:member
        return source.member_name(index)
    names = getattr(source, "names", None)  # a folder, local or gs://
    return f"{source.where.rstrip('/')}/{names[index]}" if names is not None else f"#{index}"


def _crops(images: data.EvalImages, indices: Sequence[int]) -> np.ndarray:
    """The centre crops the backbone saw, [N, S, S, 3] uint8."""
    items = images.__getitems__([int(i) for i in indices])
    return np.stack([item["image"].permute(1, 2, 0).numpy() for item in items])


def draw_neighbour_files(evaluation: Evaluation, directory: str) -> List[str]:
    """neighbours.png and neighbours.csv of an evaluation."""
    features, classes = evaluation.features, evaluation.classes
    labelled = evaluation.result is not None
    table = nearest_training_images(features, evaluation.seed)
    test, train = features[SPLIT_TEST], knn_bank(features)
    images = data.EvalImages(
        evaluation.parts,
        evaluation.hparams.augmentation.image_size,
        data.CorruptImageLog(strict=False),
    )
    query_images = test.images[table.queries].numpy()
    neighbour_images = train.images[table.neighbours].numpy()
    query_labels = test.labels[table.queries].numpy()
    neighbour_labels = train.labels[table.neighbours].numpy()
    same = neighbour_labels == query_labels[:, None]
    probe = evaluation.hparams.probe
    if labelled:
        knn = (
            f"kNN accuracy (k={probe.knn_k}, T={probe.knn_temperature:g}) on these features: "
            f"{100 * evaluation.result['knn_accuracy']:.2f}%"
        )
        frames = "frame: blue = the query's class, orange = another class"
    else:
        knn = "no labels (one class): judge the neighbours by eye"
        frames = "grey frames: the data has no classes to compare"
    title = [
        f"Nearest training images of {len(table.queries)} test images, by cosine similarity "
        f"of the backbone's features (as the kNN accuracy)",
        f"{_checkpoint_line(evaluation.checkpoint)}; queries: test split, chosen with seed "
        f"{evaluation.seed}; neighbours: the {len(train.labels)} labelled training images",
        f"{knn}; {frames}",
    ]
    query_crops = _crops(images, query_images)
    neighbour_crops = _crops(images, neighbour_images.reshape(-1))
    neighbours_png = draw_neighbours(
        os.path.join(directory, "neighbours.png"),
        query_crops,
        neighbour_crops.reshape(*neighbour_images.shape, *neighbour_crops.shape[1:]),
        [classes[c] for c in query_labels],
        [[classes[c] for c in row] for row in neighbour_labels],
        table.similarities,
        same if labelled else None,
        title,
    )
    header = ["query", "query_class", "rank", "neighbour", "neighbour_class", "cosine_similarity"]
    rows = [
        [
            image_name(evaluation.parts, query),
            classes[query_labels[q]],
            k + 1,
            image_name(evaluation.parts, neighbour),
            classes[neighbour_labels[q, k]],
            f"{table.similarities[q, k]:.6f}",
        ]
        + ([str(bool(same[q, k])).lower()] if labelled else [])
        for q, query in enumerate(query_images)
        for k, neighbour in enumerate(neighbour_images[q])
    ]
    neighbours_csv = _write_csv(
        os.path.join(directory, "neighbours.csv"),
        header + (["same_class"] if labelled else []),
        rows,
    )
    return [neighbours_png, neighbours_csv]


# ------------------------------------------------------------------------------------------
# The classifier's confusion: confusion.png and per_class.csv
# ------------------------------------------------------------------------------------------


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """[true class, predicted class] -> number of test images."""
    pairs = np.asarray(labels, np.int64) * num_classes + np.asarray(predictions, np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, -1)


def draw_confusion(path: str, counts: np.ndarray, classes: Sequence[str], title: str) -> str:
    """The row-normalised matrix (each true class's images split by predicted class): shares
    written in the cells up to 20 classes, class names on the axes up to 50."""
    n = len(classes)
    side = int(min(20, max(7, 3 + n // 2)))
    figure = _new_figure(100 * (side + 1), 100 * side, dpi=100, layout="constrained")
    ax = figure.add_subplot()
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = counts / counts.sum(axis=1, keepdims=True)
    cmap = colormaps["Blues"].with_extremes(bad="white")  # bad: a class without test images
    image = ax.imshow(np.ma.masked_invalid(shares), cmap=cmap, vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's test images")
    if n <= 20:
        for (i, j), share in np.ndenumerate(shares):
            if np.isfinite(share) and counts[i, j] > 0:
                ax.text(
                    j,
                    i,
                    f"{100 * share:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share > 0.5 else "black",
                )
    if n <= 50:
        ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels=list(classes), fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    _suptitle(figure, title.split("\n"), 10)
    return _save(figure, path)


def write_per_class(path: str, counts: np.ndarray, classes: Sequence[str]) -> str:
    """per_class.csv: each class's test images, how many the classifier got right, and the
    share (empty for a class without test images)."""
    rows = []
    for c, name in enumerate(classes):
        images, correct = int(counts[c].sum()), int(counts[c, c])
        rows.append([name, images, correct, f"{correct / images:.6f}" if images else ""])
    return _write_csv(path, ["class", "test_images", "correct", "accuracy"], rows)


def draw_confusion_files(evaluation: Evaluation, directory: str) -> List[str]:
    """confusion.png and per_class.csv of an evaluation with labels."""
    result = evaluation.result
    counts = confusion_counts(
        evaluation.features[SPLIT_TEST].labels.numpy(),
        evaluation.test_predictions.numpy(),
        len(evaluation.classes),
    )
    title = (
        f"Linear classifier (LR {result['chosen_lr']:g}, chosen on held-out images) on the "
        f"{int(counts.sum())} test images: top-1 {100 * result['test_accuracy']:.2f}%\n"
        f"{_checkpoint_line(evaluation.checkpoint)}; rows: true class, normalised to 100"
    )
    return [
        draw_confusion(os.path.join(directory, "confusion.png"), counts, evaluation.classes, title),
        write_per_class(os.path.join(directory, "per_class.csv"), counts, evaluation.classes),
    ]


# ------------------------------------------------------------------------------------------
# The test features in two dimensions: embedding.png
# ------------------------------------------------------------------------------------------


def principal_components(features: np.ndarray, count: int = 2) -> Tuple[np.ndarray, np.ndarray]:
    """The rows, centred, on their first `count` principal axes ([N, count]; each axis's sign
    set so that its largest coordinate is positive), and each axis's share of the variance."""
    centred = features.astype(np.float64) - features.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    coordinates = u[:, :count] * s[:count]
    largest = np.abs(coordinates).argmax(axis=0)
    coordinates *= np.sign(coordinates[largest, range(coordinates.shape[1])])
    return coordinates, s[:count] ** 2 / max(float((s**2).sum()), 1e-300)


def class_colours(count: int) -> np.ndarray:
    """[count, 4] RGBA: matplotlib's qualitative tab10/tab20 up to 20 classes, then a ramp."""
    if count <= 10:
        return colormaps["tab10"](np.arange(count))
    if count <= 20:
        return colormaps["tab20"](np.arange(count))
    return colormaps["turbo"](np.linspace(0, 1, count))


def draw_embedding(
    path: str,
    coordinates: np.ndarray,
    labels: Optional[np.ndarray],
    classes: Sequence[str],
    title: str,
) -> str:
    """A scatter of [N, 2] coordinates coloured by class (one colour when `labels` is None),
    with a legend up to 20 classes."""
    figure = _new_figure(1000, 800, dpi=100, layout="constrained")
    ax = figure.add_subplot()
    size = float(np.clip(20000 / max(1, len(coordinates)), 6, 40))  # points², fewer: larger
    if labels is None:
        ax.scatter(*coordinates.T, s=size, color="0.35", alpha=0.7, linewidths=0)
    else:
        colours = class_colours(len(classes))
        for c, name in enumerate(classes):
            mine = labels == c
            if mine.any():
                ax.scatter(
                    *coordinates[mine].T,
                    s=size,
                    color=colours[c],
                    alpha=0.75,
                    linewidths=0,
                    label=name,
                )
        if len(classes) <= 20:
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2)
    ax.set_xlabel("first principal component")
    ax.set_ylabel("second principal component")
    ax.set_aspect("equal", adjustable="datalim")  # distances as the features have them
    ax.grid(alpha=0.3)
    _suptitle(figure, title.split("\n"), 10)
    return _save(figure, path)


def draw_embedding_file(evaluation: Evaluation, directory: str) -> str:
    """embedding.png: the test features, L2-normalised as the kNN compares them."""
    test = evaluation.features[SPLIT_TEST]
    rows = np.arange(len(test.labels))
    if len(rows) > EMBEDDED:
        rows = np.sort(np.random.default_rng(evaluation.seed).choice(rows, EMBEDDED, False))
    normalised = torch.nn.functional.normalize(test.features[torch.from_numpy(rows)], dim=1)
    coordinates, shares = principal_components(normalised.numpy())
    labelled = evaluation.result is not None
    chosen = f"{len(rows)} of the {len(test.labels)}" if len(rows) < len(test.labels) else "the"
    title = (
        f"Backbone features of {chosen} test images (L2-normalised, as the kNN compares them) "
        f"on their first two principal components: {100 * shares[0]:.1f}% and "
        f"{100 * shares[1]:.1f}% of the variance\n"
        f"{_checkpoint_line(evaluation.checkpoint)}; "
        + ("colour: the image's class" if labelled else "no labels: one colour")
    )
    return draw_embedding(
        os.path.join(directory, "embedding.png"),
        coordinates,
        test.labels[torch.from_numpy(rows)].numpy() if labelled else None,
        evaluation.classes,
        title,
    )


def draw_evaluation(evaluation: Evaluation, directory: str, curves: bool) -> List[str]:
    """Every picture of an evaluation into `directory` (an existing, writable folder), and
    with `curves` the curves of the checkpoint's local run; each path printed. What cannot be
    drawn is said in one line (data without labels: a label-free run's), and the rest drawn."""
    labelled = evaluation.result is not None
    written: List[str] = []
    if len(evaluation.features[SPLIT_TEST].labels) == 0:
        print("no neighbours.png, confusion.png or embedding.png: no test image could be read")
    else:
        if not labelled:
            print(
                f"no labelled test split: the data has {len(evaluation.classes)} class "
                f"({', '.join(evaluation.classes)}), so there is no linear evaluation, "
                f"confusion.png or per_class.csv; neighbours.png and embedding.png show the "
                f"images without classes"
                + (", curves.png the run's validation loss" if curves else "")
            )
        written += draw_neighbour_files(evaluation, directory)
        if labelled:
            written += draw_confusion_files(evaluation, directory)
        written.append(draw_embedding_file(evaluation, directory))
        for path in written:
            print(f"wrote {path}")
    if curves:
        curves_png = draw_checkpoint_curves(evaluation.checkpoint, directory, say_why=labelled)
        written += [curves_png] if curves_png else []
    return written


# ------------------------------------------------------------------------------------------
# A run's curves: curves.png, from TensorBoard files or from the master
# ------------------------------------------------------------------------------------------

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
    figure = _new_figure(1200, 1000, dpi=100, layout="constrained")
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
    _suptitle(figure, [title] + ([f"dashed line: {mark[1]}"] if mark is not None else []), 11)
    return _save(figure, path)


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
    mark = (ckpt.steps_completed, _checkpoint_line(ckpt))
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
