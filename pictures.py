"""Pictures of what a backbone learned, for `evaluate_result.py --pictures DIR` (drawn by
figures.py; the run's curves.png: curves.py).

  neighbours.png  QUERIES test images chosen with the run's seed, each followed by its NEIGHBOURS
                  most cosine-similar labelled training images, on the features and with the
                  similarity of the kNN accuracy (probe.cosine_neighbours); each neighbour is
                  framed by whether its class is the query's. neighbours.csv names them.
  confusion.png   the confusion matrix, on the test images, of the linear classifier whose test
                  accuracy the evaluation reports (its LR chosen on held-out images),
                  row-normalised; per_class.csv holds each class's accuracy.
  embedding.png   the test features on their first two principal components, coloured by class.

Small images (CIFAR's 32 px) are magnified by a whole factor without smoothing, so every pixel
shown is one the backbone saw. Data without labels (fewer than 2 classes: a label-free run's)
gets the neighbours and the embedding without classes, and no confusion matrix.
"""

import math
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

import curves
import data
from figures import checkpoint_line, new_figure, save, suptitle, wrapped, write_csv
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
    title = wrapped(title, width - 2 * NeighbourGrid.MARGIN, 8, 128)
    grid = NeighbourGrid(image_px, len(queries), columns, len(title))
    width, height = grid.size()
    canvas = np.full((height, width, 3), 255, np.uint8)
    figure = new_figure(width, height, dpi=128)  # a power of two: pixel sizes stay exact

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
    return save(figure, path)


def image_name(parts: Sequence[Tuple[object, int]], index: int) -> str:
    """Where a user finds image `index` of data.EvalImages(parts): its file (a shard's member),
    or its row in the dataset's array (CIFAR-10, STL-10): sources' location."""
    for source, _ in parts:
        if index < len(source):
            break
        index -= len(source)
    return source.location(index)


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
        f"{checkpoint_line(evaluation.checkpoint)}; queries: test split, chosen with seed "
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
    neighbours_csv = write_csv(
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
    figure = new_figure(100 * (side + 1), 100 * side, dpi=100, layout="constrained")
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
    suptitle(figure, title.split("\n"), 10)
    return save(figure, path)


def write_per_class(path: str, counts: np.ndarray, classes: Sequence[str]) -> str:
    """per_class.csv: each class's test images, how many the classifier got right, and the
    share (empty for a class without test images)."""
    rows = []
    for c, name in enumerate(classes):
        images, correct = int(counts[c].sum()), int(counts[c, c])
        rows.append([name, images, correct, f"{correct / images:.6f}" if images else ""])
    return write_csv(path, ["class", "test_images", "correct", "accuracy"], rows)


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
        f"{checkpoint_line(evaluation.checkpoint)}; rows: true class, normalised to 100"
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
    figure = new_figure(1000, 800, dpi=100, layout="constrained")
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
    suptitle(figure, title.split("\n"), 10)
    return save(figure, path)


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
        f"{checkpoint_line(evaluation.checkpoint)}; "
        + ("colour: the image's class" if labelled else "no labels: one colour")
    )
    return draw_embedding(
        os.path.join(directory, "embedding.png"),
        coordinates,
        test.labels[torch.from_numpy(rows)].numpy() if labelled else None,
        evaluation.classes,
        title,
    )


def draw_evaluation(evaluation: Evaluation, directory: str, with_curves: bool) -> List[str]:
    """Every picture of an evaluation into `directory` (an existing, writable folder), and
    with `with_curves` the curves of the checkpoint's local run; each path printed. What cannot be
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
                + (", curves.png the run's validation loss" if with_curves else "")
            )
        written += draw_neighbour_files(evaluation, directory)
        if labelled:
            written += draw_confusion_files(evaluation, directory)
        written.append(draw_embedding_file(evaluation, directory))
        for path in written:
            print(f"wrote {path}")
    if with_curves:
        curves_png = curves.draw_checkpoint_curves(
            evaluation.checkpoint, directory, say_why=labelled
        )
        written += [curves_png] if curves_png else []
    return written
