"""evaluate_result.py --pictures and model_def.py --plot: the neighbours drawn are the ones a
brute-force computation finds (on features computed apart from the evaluation), the confusion
matrix agrees with the accuracy the report prints, every PNG opens at its size, and a run
without labels says so in one line and draws what it can.

One tiny BYOL run (module fixture, with --plot) provides the checkpoint, its TensorBoard files
and the metrics Determined reported."""

import ast
import contextlib
import csv
import io
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from determined import core
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

import checkpoint
import cluster_eval
import curves
import evaluate_result
import pictures
from conftest import CLASSES, data_dirs, synthetic_image, train_tiny_run, write_planted_folder
from test_probe import brute_force_knn_accuracy

PNG_SIZES = {  # pixels, width x height
    "confusion.png": (800, 700),  # up to 8 classes: 8 x 7 inches at 100 dpi
    "embedding.png": (1000, 800),
    "curves.png": (1200, 1000),
}


@contextlib.contextmanager
def recorded(logger_name):
    """stdout and the log messages of `logger_name` while the block runs."""
    messages, out = [], io.StringIO()

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler, logger = Keep(level=logging.INFO), logging.getLogger(logger_name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out):
            yield out, messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def evaluate(*args):
    """evaluate_result.py's command line in this process; returns what it printed."""
    with recorded("byol") as (out, _):
        evaluate_result.main([str(a) for a in args])
    return out.getvalue()


def reported_metrics(messages):
    """{(group, steps): metrics} from Determined's log lines of what the trial reported."""
    reports = {}
    for message in messages:
        for group in ("training", "validation"):
            prefix = f"report_{group}_metrics(steps_completed="
            if message.startswith(prefix):
                steps, metrics = message[len(prefix) : -1].split(", metrics=", 1)
                reports[group, int(steps)] = ast.literal_eval(metrics)
    return reports


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch (3 steps) of the training command with --plot."""
    with recorded("determined.core") as (out, messages):
        trained = train_tiny_run(tmp_path_factory.mktemp("pictures"), "--plot")
    trained.printed, trained.reports = out.getvalue(), reported_metrics(messages)
    return trained


def write_mixed_folder(root, per_class, seed):
    """<class>/*.png of 16 px: a random colour and pattern each, the class drawn at random, so
    features and neighbours are spread out and a neighbour's class often differs."""
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        os.makedirs(root / cls, exist_ok=True)
    for i in range(per_class * len(CLASSES)):
        image = rng.integers(0, 256, 3) * rng.uniform(0.3, 1.0, (16, 16, 1))
        image[rng.integers(0, 16) :, : rng.integers(1, 17)] = rng.integers(0, 256, 3)
        cls = CLASSES[rng.integers(len(CLASSES))]
        Image.fromarray(image.astype(np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def drawn(run, tmp_path_factory):
    """--pictures of the run's checkpoint, on images without a pattern to their classes:
    24 training and 36 test images."""
    root = tmp_path_factory.mktemp("drawn")
    train_dir = write_mixed_folder(root / "train", 8, seed=1)
    test_dir = write_mixed_folder(root / "test", 12, seed=2)
    printed = evaluate(
        "--checkpoint",
        run.checkpoint,
        "--classifier-train-epochs",
        3,
        "--no-augment",
        *data_dirs(train_dir, test_dir),
        "--output",
        root / "evaluation.json",
        "--pictures",
        root / "pictures",
    )
    result = json.loads((root / "evaluation.json").read_text())
    return root / "pictures", train_dir, test_dir, printed, result


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def rows_shift(image):
    """How far below NeighbourGrid(..., title_lines=0) the rows of neighbours.png start (the
    title's length varies): the first pixel row of the first query's dark frame."""
    left = pictures.NeighbourGrid.MARGIN
    frame = (image[:, left : left + 106] == pictures.QUERY_FRAME).all(axis=(1, 2))
    return int(np.argmax(frame)) - pictures.NeighbourGrid(96, 16, 9, 0).frame_origin(0, 0)[1]


# ---- choosing the queries ---------------------------------------------------------------------


def test_queries_are_a_seeded_choice_of_sixteen_test_images():
    chosen = pictures.choose_queries(36, seed=0)
    assert len(chosen) == 16 == len(set(chosen.tolist()))
    assert chosen.min() >= 0 and chosen.max() < 36 and list(chosen) == sorted(chosen)
    assert np.array_equal(chosen, pictures.choose_queries(36, seed=0))
    assert not np.array_equal(chosen, pictures.choose_queries(36, seed=1))
    assert pictures.choose_queries(12, seed=5).tolist() == list(range(12))  # fewer: all


def test_small_images_are_shown_in_whole_pixel_blocks_and_large_ones_reduced():
    rng = np.random.default_rng(0)
    cifar = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    big = pictures.shown(cifar)
    assert big.shape == (96, 96, 3)  # 3 x 3 blocks: docs/evaluation.md's "3 times larger"
    for dy in range(3):
        for dx in range(3):
            assert np.array_equal(big[dy::3, dx::3], cifar)
    assert pictures.shown(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).shape == (
        100,
        100,
        3,
    )
    photo = np.full((224, 224, 3), 77, np.uint8)
    assert np.array_equal(pictures.shown(photo), np.full((128, 128, 3), 77, np.uint8))


# ---- every PNG, its size and its printed path ---------------------------------------------------


def test_every_picture_opens_at_its_size_and_its_path_is_printed(drawn):
    directory, _, _, printed, _ = drawn
    names = ["neighbours.png", "neighbours.csv", "confusion.png", "per_class.csv"]
    names += ["embedding.png", "curves.png"]
    for name in names:
        assert f"wrote {directory / name}\n" in printed
    assert sorted(os.listdir(directory)) == sorted(names)  # no temp files left
    for name, size in PNG_SIZES.items():
        with Image.open(directory / name) as image:
            assert (image.format, image.size) == ("PNG", size), name
    # 16 rows of a query and 8 neighbours; 16 px crops shown at 96 px (x6) in 106 px frames.
    with Image.open(directory / "neighbours.png") as image:
        assert image.format == "PNG" and image.width == 16 + 106 + 28 + 8 * 106 + 7 * 8 + 16


# ---- neighbours.png: the brute-force neighbours, pixel for pixel --------------------------------


def backbone_features(ckpt_dir, files):
    """The online backbone's pooled features of 16 px image files, computed here: the image
    itself (16 px is the evaluation size: no crop), scaled to [0, 1], normalised with the
    checkpoint's mean and std, through the torchvision ResNet that holds its weights."""
    ckpt = checkpoint.read(str(ckpt_dir))
    model, _ = checkpoint.load_backbone(ckpt, checkpoint.hparams_of(ckpt))
    norm = json.loads((ckpt_dir / checkpoint.MARKER).read_text())["normalization"]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float64) for f in files])
    x = (pixels / 255 - np.array(norm["mean"])) / np.array(norm["std"])
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2).float()).double().numpy()


def image_files(folder):
    """<class>/<image> files and their labels, in the order of the class names."""
    files = [
        (str(folder / c / f), i) for i, c in enumerate(CLASSES) for f in os.listdir(folder / c)
    ]
    return [f for f, _ in sorted(files)], np.array([label for _, label in sorted(files)])


def test_the_evaluations_knn_accuracy_is_the_brute_force_one_on_these_features(run, drawn):
    """The number in neighbours.png's title: weighted kNN (k 5, temperature 0.1, the run's)
    of the test images among all labelled training images, on the features computed here."""
    _, train_dir, test_dir, _, result = drawn
    (train, train_y), (test, test_y) = image_files(train_dir), image_files(test_dir)
    expected = brute_force_knn_accuracy(
        backbone_features(run.checkpoint, train),
        train_y,
        backbone_features(run.checkpoint, test),
        test_y,
        len(CLASSES),
        k=5,
        temperature=0.1,
    )
    assert 0 < expected < 1  # not a saturated case any features would give
    assert result["knn_accuracy"] == pytest.approx(expected, abs=1e-7)  # a float32 there


def test_the_neighbours_drawn_are_the_brute_force_nearest_training_images(run, drawn):
    directory, train_dir, test_dir, _, _ = drawn
    rows = read_csv(directory / "neighbours.csv")
    queries = list(dict.fromkeys(r["query"] for r in rows))
    assert len(queries) == 16 and all(q.startswith(str(test_dir)) for q in queries)
    train, _ = image_files(train_dir)
    bank = backbone_features(run.checkpoint, train)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    query_features = backbone_features(run.checkpoint, queries)

    image = rgb(directory / "neighbours.png")
    layout, shift = pictures.NeighbourGrid(96, 16, 9, 0), rows_shift(image)
    magnified = lambda f: np.asarray(Image.open(f).convert("RGB")).repeat(6, 0).repeat(6, 1)
    different = 0
    for q, query in enumerate(queries):
        similarity = bank @ (query_features[q] / np.linalg.norm(query_features[q]))
        nearest = np.argsort(-similarity)[:8]
        mine = [r for r in rows if r["query"] == query]
        assert [r["neighbour"] for r in mine] == [train[i] for i in nearest]
        assert [float(r["cosine_similarity"]) for r in mine] == pytest.approx(
            similarity[nearest], abs=1e-4
        )
        query_class = os.path.basename(os.path.dirname(query))
        for column, name in enumerate([query] + [train[i] for i in nearest]):
            x, y = layout.image_origin(q, column)
            cell = image[y + shift : y + shift + 96, x : x + 96]
            assert np.array_equal(cell, magnified(name)), (q, column)
            if column:
                same = os.path.basename(os.path.dirname(name)) == query_class
                different += not same
                fx, fy = layout.frame_origin(q, column)
                expected = pictures.SAME_CLASS if same else pictures.OTHER_CLASS
                assert tuple(image[fy + shift + 1, fx + 1]) == expected, (q, column)
    assert different > 0  # both frame colours were checked


# ---- confusion.png and per_class.csv ------------------------------------------------------------


def test_the_confusion_matrix_agrees_with_the_printed_accuracy(drawn):
    directory, _, test_dir, printed, result = drawn
    per_class = read_csv(directory / "per_class.csv")
    assert [r["class"] for r in per_class] == CLASSES
    assert [int(r["test_images"]) for r in per_class] == [
        len(os.listdir(test_dir / c)) for c in CLASSES
    ]
    for r in per_class:
        written = float(r["accuracy"])  # 6 decimals
        assert written == pytest.approx(int(r["correct"]) / int(r["test_images"]), abs=5e-7)
    accuracy = sum(int(r["correct"]) for r in per_class) / 36
    assert accuracy == pytest.approx(result["test_accuracy"], abs=1e-7)  # a float32 there
    assert f"test top-1 {100 * accuracy:.2f}%" in printed  # the report's summary line


def test_confusion_rows_are_true_classes_and_per_class_accuracy_is_by_true_class(
    run, tmp_path, capsys
):
    """Planted classes (the colour fills the image) with the test's cat folder holding airplane
    pictures: the classifier that learns (LR 1.0 over 1e-7) calls them airplanes, so cat's row
    is all airplane and cat's accuracy 0. The checkpoint, moved away from its run's folder,
    gets one line instead of curves.png."""
    train_dir = write_planted_folder(tmp_path / "train", per_class=8)
    test_dir = write_planted_folder(tmp_path / "test", per_class=4)
    shutil.rmtree(test_dir / "cat")
    shutil.copytree(test_dir / "airplane", test_dir / "cat")
    moved = tmp_path / "elsewhere" / run.uuid
    shutil.copytree(run.checkpoint, moved)
    printed = evaluate(
        "--checkpoint",
        moved,
        "--classifier-train-epochs",
        3,
        "--no-augment",
        "--classifier-lrs",
        1e-7,
        1.0,
        *data_dirs(train_dir, test_dir),
        "--pictures",
        tmp_path / "pictures",
    )
    per_class = {r["class"]: r for r in read_csv(tmp_path / "pictures" / "per_class.csv")}
    assert {c: (r["correct"], r["accuracy"]) for c, r in per_class.items()} == {
        "airplane": ("4", "1.000000"),
        "cat": ("0", "0.000000"),
        "ship": ("4", "1.000000"),
    }
    assert "test top-1 66.67%" in printed
    (line,) = [line for line in printed.splitlines() if "curves.png" in line]
    assert line.startswith(f"no curves.png for checkpoint {run.uuid}: its run's TensorBoard folder")
    assert not (tmp_path / "pictures" / "curves.png").exists()


def dark_cells_box(path):
    """Width and height of the box around the plot's cells of share 1 (Blues' darkest), the
    colour bar (right of the plot) left out."""
    image = rgb(path).astype(int)
    dark = (np.abs(image - (8, 48, 107)).sum(axis=2) < 40)[:, : int(image.shape[1] * 0.75)]
    ys, xs = np.nonzero(dark)
    return xs.max() - xs.min(), ys.max() - ys.min()


def test_confusion_png_has_true_classes_down_and_predictions_across(tmp_path):
    # Every image of both classes predicted "a": the left column is full, the right empty.
    counts = pictures.confusion_counts(np.array([0] * 5 + [1] * 5), np.zeros(10, int), 2)
    assert counts.tolist() == [[5, 0], [5, 0]]
    pictures.draw_confusion(str(tmp_path / "c.png"), counts, ["a", "b"], "test")
    width, height = dark_cells_box(tmp_path / "c.png")
    assert height > 1.8 * width  # a column of two cells, not a row


# ---- embedding.png ------------------------------------------------------------------------------


def test_principal_components_match_numpys_eigenvectors_of_the_covariance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    x = x @ np.linalg.qr(rng.normal(size=(6, 6)))[0] + 7.0  # rotated and moved
    coordinates, shares = pictures.principal_components(x)
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    top = vectors[:, ::-1][:, :2]
    expected = (x - x.mean(axis=0)) @ top
    for i in range(2):  # an axis's sign is a convention
        sign = np.sign(expected[:, i] @ coordinates[:, i])
        np.testing.assert_allclose(coordinates[:, i], sign * expected[:, i], atol=1e-9)
    np.testing.assert_allclose(shares, values[::-1][:2] / values.sum(), rtol=1e-9)
    line = np.outer(np.arange(10.0), [1.0, 2.0, 2.0])  # on a line: one axis holds it all
    assert pictures.principal_components(line)[1] == pytest.approx([1.0, 0.0], abs=1e-12)


# ---- curves.png -----------------------------------------------------------------------------------


def test_tensorboard_series_name_the_metrics_as_reported_and_keep_the_later_of_a_step(tmp_path):
    """Two event files, as a run resumed from its step-2 checkpoint leaves them: the second
    logs steps 3 and 4 again (the first had reached step 3). Batch metrics (learning_rate)
    are logged at the batch's index, one less than steps completed."""
    first = SummaryWriter(str(tmp_path), filename_suffix=".1")  # values exact in float32
    for step, lr, loss in ((1, 0.125, 3.0), (2, 0.25, 2.0), (3, 0.375, 1.5)):
        first.add_scalar("Determined/learning_rate", lr, step - 1, walltime=100 + step)
        first.add_scalar("Determined/loss", loss, step, walltime=100 + step)
    first.add_scalar("Determined/val_holdout_accuracy", 0.5, 3, walltime=104)
    first.add_scalar("other/thing", 1.0, 3, walltime=104)
    first.close()
    second = SummaryWriter(str(tmp_path), filename_suffix=".2")
    for step, lr, loss in ((3, 0.3125, 1.25), (4, 0.4375, 1.0)):
        second.add_scalar("Determined/learning_rate", lr, step - 1, walltime=200 + step)
        second.add_scalar("Determined/loss", loss, step, walltime=200 + step)
    second.add_scalar("Determined/val_knn_accuracy", 0.625, 4, walltime=205)
    second.add_scalar("Determined/validation_loss", 0.75, 4, walltime=205)
    second.close()
    # File names need not sort in time order (a counter past 9 sorts before 2): read the
    # second file first.
    (later,) = [f for f in os.listdir(tmp_path) if f.endswith(".2")]
    os.rename(tmp_path / later, tmp_path / "events.out.tfevents.0000000001.host.1.0")
    series = curves.tensorboard_series(str(tmp_path))
    assert series == {
        "loss": [(1, 3.0), (2, 2.0), (3, 1.25), (4, 1.0)],
        "learning_rate": [(1, 0.125), (2, 0.25), (3, 0.3125), (4, 0.4375)],
        "holdout_accuracy": [(3, 0.5)],
        "knn_accuracy": [(4, 0.625)],
        "validation_loss": [(4, 0.75)],
    }


def test_a_run_before_its_first_validation_gets_its_curves_and_no_note(tmp_path, capsys):
    writer = SummaryWriter(str(tmp_path / "run"))
    for step in (1, 2, 3):
        writer.add_scalar("Determined/loss", 4.0 - step, step)
    writer.close()
    path = curves.draw_tensorboard_curves(str(tmp_path / "run"))
    assert capsys.readouterr().out == f"wrote {path}\n"  # no word of labels: none are known yet
    with Image.open(path) as image:
        assert image.size == PNG_SIZES["curves.png"]


def test_plot_draws_the_runs_curves_from_what_it_reported(run):
    folder = checkpoint.run_tensorboard_folder(checkpoint.read(str(run.checkpoint)))
    assert os.path.dirname(folder) == str(run.root / "ckpt" / "tensorboard")
    assert f"wrote {os.path.join(folder, 'curves.png')}\n" in run.printed
    with Image.open(os.path.join(folder, "curves.png")) as image:
        assert (image.format, image.size) == ("PNG", PNG_SIZES["curves.png"])
    series = curves.tensorboard_series(folder)
    training = {s: m for (group, s), m in run.reports.items() if group == "training"}
    assert sorted(training) == [1, 2, 3]
    # scheduling_unit 1: a report per step, so a batch metric is that step's report.
    for name in ("loss", "representation_std", "learning_rate", "tau"):
        assert series[name] == [
            (s, pytest.approx(m[name], rel=1e-6)) for s, m in sorted(training.items())
        ], name
    validation = run.reports["validation", 3]
    for name in ("holdout_accuracy", "knn_accuracy"):
        assert series[name] == [(3, pytest.approx(validation[name], rel=1e-6))]


# ---- a run without labels -------------------------------------------------------------------------


def write_one_class_folder(root, count, seed):
    rng = np.random.default_rng(seed)
    os.makedirs(root / "all")
    for i in range(count):
        Image.fromarray(synthetic_image(rng, i % 3, 16)).save(root / "all" / f"{i:03d}.png")
    return root


def test_a_run_without_labels_says_so_in_one_line_and_draws_what_it_can(tmp_path, capsys):
    train_dir = write_one_class_folder(tmp_path / "train", 24, seed=3)
    test_dir = write_one_class_folder(tmp_path / "test", 20, seed=4)
    with recorded("byol") as (out, _):
        trained = train_tiny_run(
            tmp_path,
            "--plot",
            *data_dirs(train_dir, test_dir),
            *(
                "--set",
                "searcher.metric=validation_loss",
                "--set",
                "searcher.smaller_is_better=true",
            ),
            validate_with_classifier=False,
        )
    lines = [line for line in out.getvalue().splitlines() if "labelled test split" in line]
    assert lines == [
        "no labelled test split in this run (it validated without labels, "
        "hyperparameters.validate_with_classifier=false): curves.png shows its validation loss "
        "instead of the kNN and held-out accuracy"
    ]
    assert out.getvalue().splitlines()[-1].endswith("curves.png")

    printed = evaluate("--checkpoint", trained.checkpoint, "--pictures", tmp_path / "pictures")
    (line,) = [line for line in printed.splitlines() if "labelled test split" in line]
    assert line == (
        "no labelled test split: the data has 1 class (all), so there is no linear evaluation, "
        "confusion.png or per_class.csv; neighbours.png and embedding.png show the images "
        "without classes, curves.png the run's validation loss"
    )
    assert printed.splitlines()[0] == line  # before any work is printed
    assert sorted(os.listdir(tmp_path / "pictures")) == [
        "curves.png",
        "embedding.png",
        "neighbours.csv",
        "neighbours.png",
    ]
    assert not (trained.checkpoint / evaluate_result.EVALUATION_FILE).exists()
    for name in ("embedding.png", "curves.png"):
        with Image.open(tmp_path / "pictures" / name) as image:
            assert image.size == PNG_SIZES[name]
    image = rgb(tmp_path / "pictures" / "neighbours.png")
    x, y = pictures.NeighbourGrid(96, 16, 9, 0).frame_origin(0, 1)
    assert tuple(image[y + rows_shift(image) + 1, x + 1]) == pictures.NO_CLASS
    assert len(read_csv(tmp_path / "pictures" / "neighbours.csv")) == 16 * 8

    # Without --pictures, the evaluation refuses data without classes, as before.
    with pytest.raises(SystemExit) as refused:
        evaluate_result.main(["--checkpoint", str(trained.checkpoint)])
    assert "linear evaluation needs at least 2" in str(refused.value.code)


def test_a_test_split_without_a_readable_image_says_so_and_draws_the_curves(run, tmp_path):
    unreadable = tmp_path / "test"
    for cls in CLASSES:
        os.makedirs(unreadable / cls)
        (unreadable / cls / "broken.png").write_bytes(b"not a png")
    printed = evaluate(
        "--checkpoint",
        run.checkpoint,
        "--classifier-train-epochs",
        1,
        "--no-augment",
        "--set",
        f"data.test_dir={unreadable}",
        "--output",
        tmp_path / "evaluation.json",
        "--pictures",
        tmp_path / "pictures",
    )
    assert "no neighbours.png, confusion.png or embedding.png: no test image could be read\n" in (
        printed
    )
    assert os.listdir(tmp_path / "pictures") == ["curves.png"]


# ---- on a cluster: the evaluation task stores its pictures as a checkpoint ----------------------


def test_a_cluster_evaluation_stores_its_pictures_as_a_checkpoint_at_its_validation_step(
    run, tmp_path, capsys
):
    storage = tmp_path / "storage"
    shutil.copytree(run.checkpoint, storage / run.uuid)
    config = cluster_eval.evaluation_experiment_config({}, run.uuid, 2, False, pictures=True)
    args = evaluate_result.parse_args(config["entrypoint"][2:])
    assert args.pictures == cluster_eval.PICTURES_IN_TASK
    args.pictures = str(tmp_path / "task-workdir" / args.pictures)
    reported = []
    with core.init(checkpoint_storage=str(storage)) as context:
        context.train.report_validation_metrics = lambda steps_completed, metrics: reported.append(
            steps_completed
        )
        evaluate_result.evaluate_in_cluster(args, context, data_section=None)
    printed = capsys.readouterr().out
    (line,) = [line for line in printed.splitlines() if line.startswith("pictures stored as")]
    uuid = line.split()[4].rstrip(":")
    assert line == f"pictures stored as checkpoint {uuid}: det checkpoint download {uuid}"
    stored = storage / uuid
    assert sorted(os.listdir(stored)) == [
        "confusion.png",
        "embedding.png",
        "metadata.json",
        "neighbours.csv",
        "neighbours.png",
        "per_class.csv",
    ]
    assert json.loads((stored / "metadata.json").read_text()) == {"steps_completed": reported[0]}


# ---- bad input --------------------------------------------------------------------------------------


def test_an_unwritable_pictures_folder_is_refused_before_the_evaluation(run, capsys):
    with pytest.raises(SystemExit) as refused:
        evaluate_result.main(
            ["--checkpoint", str(run.checkpoint), "--pictures", "/proc/forbidden-dir"]
        )
    assert refused.value.code == (
        "error: --pictures '/proc/forbidden-dir' is not a writable directory: "
        "No such file or directory"
    )
    assert "Linear evaluation" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate_result.main(
            ["--checkpoint", "x", "--export", "b.pt", "--export-only", "--pictures", "p"]
        )
    assert "--pictures draws what the evaluation computes" in capsys.readouterr().err
