"""`python model_def.py CONFIG --check`: the corner points of a search space (hpspace.py, against
hand-worked values), and the check itself (preflight.py) on the shipped configs, on planted
errors, on data folders, download dirs and gs:// locations (the gcp-storage-emulator)."""

import itertools
import os
import re
import shutil

import pytest
import torch

import finetune
import hpspace
import model_def
import preflight
from config import ConfigError
from conftest import KNOWN_FAMILIES, ROOT, run_python, write_cifar10, write_stl10
from gcs_server import FakeGCS

SEARCHED_POINT = "learning_rate=0.1, weight_decay=1e-06, tau_base=0.97"


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch, tmp_path):
    """No machine's Google credentials reach these tests: GOOGLE_APPLICATION_CREDENTIALS names
    a file that is not there, which google-auth refuses before looking anywhere else."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-credentials.json"))
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)


def check(config, *sets, download_dir=None):
    """The config's command line (finetune.py for a fine-tuning config, else model_def.py) with
    --check: its exit status."""
    argv = [os.path.join(ROOT, config) if not os.path.isabs(config) else config, "--check"]
    if download_dir is not None:
        sets += (f"data.download_dir={download_dir}",)
    for value in sets:
        argv += ["--set", value]
    command = finetune.main if "finetune" in os.path.basename(config) else model_def.main
    with pytest.raises(SystemExit) as exit_info:
        command(argv)
    return exit_info.value.code


def lines_of(capsys, prefix):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(prefix)]


# ---------------------------------------------------------------------------------------------
# hpspace.py
# ---------------------------------------------------------------------------------------------


def typed(values):
    return [(type(v).__name__, v) for v in values]


def test_corners_of_every_form():
    hyperparameters = {
        "plain": 3,
        "wrapped": {"type": "const", "val": [0.2, 1.0]},
        "ints": {"type": "int", "minval": 2, "maxval": 5},
        "doubles": {"type": "double", "minval": 0, "maxval": 0.5},
        "logs": {"type": "log", "base": 2, "minval": -1, "maxval": 3},
        "choice": {"type": "categorical", "vals": ["a", "b", "a", 1, 1.0, True]},
        "nested": {"inner": {"deeper": {"type": "int", "minval": -3, "maxval": -1}}, "on": False},
        "empty": {},
    }
    space = hpspace.corners(hyperparameters)
    expected = {
        ("plain",): [3],
        ("wrapped",): [[0.2, 1.0]],
        ("ints",): [2, 5],  # Determined 0.38.1 draws both ends of an int range
        ("doubles",): [0.0, 0.5],
        ("logs",): [0.5, 8.0],  # 2**-1, 2**3
        ("choice",): ["a", "b", 1, 1.0, True],
        ("nested", "inner", "deeper"): [-3, -1],
        ("nested", "on"): [False],
    }
    assert list(space) == list(expected)
    assert {k: typed(v) for k, v in space.items()} == {k: typed(v) for k, v in expected.items()}
    assert hpspace.searched(space) == [
        ("ints",),
        ("doubles",),
        ("logs",),
        ("choice",),
        ("nested", "inner", "deeper"),
    ]


def test_grid_corners_are_the_grid_ends_or_its_midpoint():
    grid = {
        "one": {"type": "int", "minval": 2, "maxval": 3, "count": 1},  # 2.5: Go rounds to 3
        "negative": {"type": "int", "minval": -3, "maxval": -2, "count": 1},  # -2.5 -> -3
        "clamped": {"type": "int", "minval": 0, "maxval": 1, "count": 5},
        "spread": {"type": "int", "minval": 0, "maxval": 10, "count": 4},
        "middle": {"type": "double", "minval": 0, "maxval": 1, "count": 1},
        "log_middle": {"type": "log", "base": 10, "minval": -2, "maxval": 0, "count": 1},
        "log_ends": {"type": "log", "base": 10, "minval": -2, "maxval": 0, "count": 3},
    }
    space = hpspace.corners(grid, grid=True)
    assert {k[0]: typed(v) for k, v in space.items()} == {
        "one": typed([3]),
        "negative": typed([-3]),
        "clamped": typed([0, 1]),
        "spread": typed([0, 10]),
        "middle": typed([0.5]),
        "log_middle": typed([0.1]),
        "log_ends": typed([0.01, 1.0]),
    }


@pytest.mark.parametrize(
    "spec,grid,message",
    [
        (
            {"type": "int", "minval": 5, "maxval": 5},
            False,
            "hyperparameters.x: minval=5 must be less than maxval=5",
        ),
        (
            {"type": "float", "minval": 0, "maxval": 1},
            False,
            "hyperparameters.x: type 'float' is not one of: const, int, double, log, categorical",
        ),
        (
            {"type": "log", "minval": -3, "maxval": -1},
            False,
            "hyperparameters.x (type: log) needs base",
        ),
        (
            {"type": "log", "minval": -3, "maxval": -1, "base": 0},
            False,
            "hyperparameters.x.base=0 must be a number > 0",
        ),
        (
            {"type": "categorical", "vals": []},
            False,
            "hyperparameters.x.vals=[] must be a non-empty list",
        ),
        (
            {"type": "int", "minval": 0.5, "maxval": 2},
            False,
            "hyperparameters.x.minval=0.5 must be an integer (type: int)",
        ),
        (
            {"type": "double", "minval": 0, "maxval": 1, "step": 0.1},
            False,
            "hyperparameters.x (type: double) has unknown key(s) step; "
            "allowed: type, minval, maxval, count",
        ),
        (
            {"type": "double", "minval": 0, "maxval": 1},
            True,
            "hyperparameters.x: grid search needs count (how many values, minval to maxval)",
        ),
    ],
)
def test_a_malformed_search_space_is_one_line(spec, grid, message):
    with pytest.raises(ConfigError) as error:
        hpspace.corners({"x": spec}, grid=grid)
    assert str(error.value) == message


def test_small_spaces_are_the_whole_product_in_order():
    space = {("a",): [1, 2], ("b",): ["x", "y", "z"], ("c",): [0.5]}
    points, exhaustive = hpspace.corner_points(space)
    assert exhaustive
    assert points == [
        {("a",): 1, ("b",): "x"},
        {("a",): 1, ("b",): "y"},
        {("a",): 1, ("b",): "z"},
        {("a",): 2, ("b",): "x"},
        {("a",): 2, ("b",): "y"},
        {("a",): 2, ("b",): "z"},
    ]
    assert hpspace.corner_points({("c",): [0.5]}) == ([{}], True)


def test_three_binary_axes_take_the_four_rows_of_the_smallest_pairwise_array():
    # Two binary axes alone have 4 combinations, so 4 rows are the least possible.
    assert hpspace.all_pairs([2, 2, 2]) == [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)]


@pytest.mark.parametrize("sizes", [[2] * 13, [2, 3, 4, 5, 1, 3], [5] * 6])
def test_large_spaces_cover_every_pair_at_every_corner_combination(sizes):
    space = {(f"h{k}",): [f"h{k}v{v}" for v in range(n)] for k, n in enumerate(sizes)}
    points, exhaustive = hpspace.corner_points(space, limit=100)
    assert not exhaustive
    searched = [path for path in space if len(space[path]) > 1]
    rows = [tuple(point[path] for path in searched) for point in points]
    assert len(set(rows)) == len(rows) < 100
    for a, b in itertools.combinations(range(len(searched)), 2):
        met = {(row[a], row[b]) for row in rows}
        assert met == set(itertools.product(space[searched[a]], space[searched[b]]))


def test_hparams_at_a_point_is_what_a_trial_receives():
    hyperparameters = {
        "lr": {"type": "log", "base": 10, "minval": -1, "maxval": 0},
        "aug": {"size": 32, "view": {"p": {"type": "categorical", "vals": [0.5, 1.0]}}},
        "scale": [0.2, 1.0],
        "tau": {"type": "const", "val": 0.99},
        "empty": {},
    }
    space = hpspace.corners(hyperparameters)
    hparams = hpspace.hparams_at(hyperparameters, space, {("lr",): 0.1, ("aug", "view", "p"): 1.0})
    # Whole numbers arrive as ints: the master holds hyperparameters as Go float64 JSON numbers.
    assert hparams == {
        "lr": 0.1,
        "aug": {"size": 32, "view": {"p": 1}},
        "scale": [0.2, 1],
        "tau": 0.99,
        "empty": {},
    }
    assert type(hparams["aug"]["view"]["p"]) is int and type(hparams["scale"][1]) is int


# ---------------------------------------------------------------------------------------------
# The check on the shipped configs
# ---------------------------------------------------------------------------------------------

IMAGENET_BUCKET = (
    "data.train_dir=gs://byol-data/imagenet/train-shards/index.json",
    "data.test_dir=gs://byol-data/imagenet/val-shards/index.json",
)


@pytest.mark.parametrize(
    "config,sets,points",
    [
        ("const-cifar10.yaml", (), "1 hyperparameter point"),
        ("search-cifar10.yaml", (), "8 hyperparameter points"),
        ("distributed-stl10.yaml", (), "1 hyperparameter point"),
        ("distributed-imagenet.yaml", IMAGENET_BUCKET, "1 hyperparameter point"),
        ("finetune-cifar10.yaml", (), "1 hyperparameter point"),
        ("search-finetune-cifar10.yaml", (), "2 hyperparameter points"),
    ],
)
def test_shipped_configs_pass(config, sets, points, tmp_path, capsys):
    downloads = "cifar10" in config or "stl10" in config  # the others have no download_dir
    status = check(config, *sets, download_dir=tmp_path if downloads else None)
    out = capsys.readouterr().out.splitlines()
    assert status == 0 and out[-1] == f"ok: {points} checked", out
    assert not [line for line in out if line.startswith("error:")]


def test_a_fine_tuning_config_with_two_backbone_sources_or_a_missing_checkpoint_fails(
    tmp_path, capsys
):
    two = ("hyperparameters.pretrained.checkpoint=/x", "hyperparameters.pretrained.export=/y.pt")
    assert check("finetune-cifar10.yaml", *two, download_dir=tmp_path) == 1
    assert lines_of(capsys, "error:") == [
        "error: hyperparameters.pretrained sets checkpoint and export: set at most one (none: "
        "random initialisation)"
    ]
    missing = f"hyperparameters.pretrained.checkpoint={tmp_path / 'nowhere'}"
    assert check("search-finetune-cifar10.yaml", missing, download_dir=tmp_path) == 1
    assert lines_of(capsys, "error:") == [
        f"error: hyperparameters.pretrained.checkpoint: checkpoint '{tmp_path / 'nowhere'}' does "
        f"not exist or is not a directory (at all 2 points)"
    ]


def test_shipped_imagenet_config_asks_for_its_bucket(capsys):
    """As shipped, distributed-imagenet.yaml names the placeholder gs://YOUR-BUCKET."""
    assert check("distributed-imagenet.yaml") == 1
    rule = (
        "'YOUR-BUCKET' is not a valid bucket name (3-222 characters: lower-case letters, digits, "
        "'-', '_' and '.', starting and ending with a letter or digit)"
    )
    assert lines_of(capsys, ("error:", "failed:")) == [
        f"error: data.train_dir: 'gs://YOUR-BUCKET/imagenet/train-shards/index.json': {rule}",
        f"error: data.test_dir: 'gs://YOUR-BUCKET/imagenet/val-shards/index.json': {rule}",
        "failed: 2 problems, 1 hyperparameter point checked",
    ]


def test_the_command_as_a_user_runs_it(tmp_path):
    """A subprocess from another directory, as a user runs it: exit 0, the ok line last."""
    env = dict(os.environ, GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "none.json"))
    shutil.copy(os.path.join(ROOT, "search-cifar10.yaml"), tmp_path)
    (tmp_path / "elsewhere").mkdir()
    done = run_python(
        os.path.join(ROOT, "model_def.py"),
        "../search-cifar10.yaml",
        "--check",
        cwd=tmp_path / "elsewhere",
        env=env,
    )
    out = done.stdout.splitlines()
    assert done.returncode == 0 and out[-1] == "ok: 8 hyperparameter points checked", done


# ---------------------------------------------------------------------------------------------
# Planted errors in a search space
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets,expected",
    [
        (
            (
                "hyperparameters.global_batch_size={type: categorical, vals: [16, 12]}",
                "resources.slots_per_trial=8",
            ),
            [
                "error: hyperparameters.global_batch_size=12 cannot be split over 8 slots: it must "
                "be a multiple of the slot count with at least 2 images per slot (BatchNorm needs "
                f"2), e.g. 16 (at global_batch_size=12, {SEARCHED_POINT}; and 7 more points)",
                "failed: 1 problem, 16 hyperparameter points checked",
            ],
        ),
        (
            ("hyperparameters.tau_base={type: log, base: 10, minval: -0.02, maxval: 0.01}",),
            [
                "error: hyperparameters.tau_base=1.023292992280754 must be a number in [0.0, 1.0] "
                "(at learning_rate=0.1, weight_decay=1e-06, tau_base=1.02329; and 3 more points)",
                "failed: 1 problem, 8 hyperparameter points checked",
            ],
        ),
        (
            ("hyperparameters.backbone_name={type: categorical, vals: [resnet18, resnet5O]}",),
            [
                "error: hyperparameters.backbone_name='resnet5O' is not a known backbone (did you "
                f"mean resnet50?): {KNOWN_FAMILIES} (at backbone_name=resnet5O, {SEARCHED_POINT}; and "
                "7 more points)",
                "failed: 1 problem, 16 hyperparameter points checked",
            ],
        ),
        (
            ("hyperparameters.epochs={type: int, minval: 50, maxval: 100}",),
            [
                "error: searcher.max_time=100 must equal hyperparameters.epochs=50 (time_metric: "
                f"epochs): a trial trains that long (at epochs=50, {SEARCHED_POINT}; and 7 more "
                "points)",
                "failed: 1 problem, 16 hyperparameter points checked",
            ],
        ),
        (
            ("resources.slots_per_trial=0",),
            [
                "error: resources.slots_per_trial=0 must be an integer >= 1",
                "failed: 1 problem, 0 hyperparameter points checked",
            ],
        ),
    ],
)
def test_a_planted_error_fails_naming_its_point(sets, expected, tmp_path, capsys):
    assert check("search-cifar10.yaml", *sets, download_dir=tmp_path) == 1
    assert lines_of(capsys, ("error:", "failed:")) == expected


def test_a_grid_search_is_checked_at_its_own_points(tmp_path, capsys):
    """count: 1 takes only the midpoint (tau_base 1.0, allowed); a random search draws up to
    the range's end (1.1, refused)."""
    ranges = (
        "hyperparameters.tau_base={type: double, minval: 0.9, maxval: 1.1, count: 1}",
        "hyperparameters.global_batch_size={type: int, minval: 12, maxval: 17, count: 2}",
    )
    grid = "searcher={name: grid, metric: holdout_accuracy, smaller_is_better: false}"
    assert check("const-cifar10.yaml", grid, *ranges, download_dir=tmp_path) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "ok: 2 hyperparameter points checked"
    random = grid.replace("grid,", "random, max_trials: 4,")
    assert check("const-cifar10.yaml", random, *ranges, download_dir=tmp_path) == 1
    assert lines_of(capsys, ("error:", "failed:")) == [
        "error: hyperparameters.tau_base=1.1 must be a number in [0.0, 1.0] (at "
        "global_batch_size=12, tau_base=1.1; and 1 more point)",
        "failed: 1 problem, 4 hyperparameter points checked",
    ]


def test_an_error_is_found_among_all_pairs_of_a_large_space(tmp_path, capsys):
    """13 searched hyperparameters (2**13 = 8192 corner combinations): pairs, not the product."""
    ranges = [
        f"hyperparameters.augmentation.{key}={{type: double, minval: 0.1, maxval: 0.3}}"
        for key in ("flip_prob", "jitter_prob", "brightness", "contrast", "saturation", "hue")
    ] + [
        "hyperparameters.warmup_epochs={type: int, minval: 1, maxval: 10}",
        "hyperparameters.lars_momentum={type: double, minval: 0.8, maxval: 0.95}",
        "hyperparameters.knn_k={type: int, minval: 20, maxval: 200}",
        "hyperparameters.global_batch_size={type: categorical, vals: [256, 12]}",
        "resources.slots_per_trial=8",
    ]
    assert check("search-cifar10.yaml", *ranges, download_dir=tmp_path) == 1
    out = capsys.readouterr().out.splitlines()
    (coverage,) = [line for line in out if "every pair of" in line]
    points = int(re.match(r"note: (\d+) points", coverage).group(1))
    assert points < 8192 and coverage.endswith(
        "every pair of 13 searched hyperparameters at all their corner combinations, the others "
        "at a corner (all 8192 combinations would be more than 4096)"
    )
    (error,) = [line for line in out if line.startswith("error:")]
    assert error.startswith("error: hyperparameters.global_batch_size=12 cannot be split over 8")
    assert out[-1] == f"failed: 1 problem, {points} hyperparameter points checked"


# ---------------------------------------------------------------------------------------------
# Data locations
# ---------------------------------------------------------------------------------------------


def folder_sets(folder, **hparams):
    """`--set`s for an image folder (conftest.write_image_folder: 24 training images)."""
    sets = [
        "hyperparameters.dataset_name=image_folder",
        f"data.train_dir={folder / 'train'}",
        f"data.test_dir={folder / 'test'}",
    ]
    hparams = dict({"global_batch_size": 8}, **hparams)
    return sets + [f"hyperparameters.{key}={value}" for key, value in hparams.items()]


def test_a_present_folder_is_scanned_and_checked_against_each_point(image_folder, capsys):
    """24 training images in 3 classes: a global batch of 32 cannot be one batch of them."""
    sets = folder_sets(image_folder, global_batch_size="{type: categorical, vals: [8, 32]}")
    assert check("const-cifar10.yaml", *sets) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"note: data.train_dir='{image_folder / 'train'}': 24 images in 3 classes" in out
    assert f"note: data.test_dir='{image_folder / 'test'}': 12 images in 3 classes" in out
    assert [line for line in out if line.startswith(("error:", "failed:"))] == [
        "error: the training set has 24 images, fewer than one global batch (32); lower "
        "hyperparameters.global_batch_size (at global_batch_size=32)",
        "failed: 1 problem, 2 hyperparameter points checked",
    ]


def test_a_missing_folder_is_a_note_not_a_problem(image_folder, tmp_path, capsys):
    sets = folder_sets(image_folder) + [f"data.train_dir={tmp_path / 'on-the-agents'}"]
    assert check("const-cifar10.yaml", *sets) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        f"note: data.train_dir='{tmp_path / 'on-the-agents'}' is not here: not checked (it may "
        "be on the agents)"
    ) in out
    assert out[-1] == "ok: 1 hyperparameter point checked"


def test_folder_rules_of_the_trial(image_folder, capsys):
    """Test classes must be the training classes; one class is too few for the probe, only at
    the points that validate with it."""
    (image_folder / "test" / "ship").rename(image_folder / "test" / "boat")
    assert check("const-cifar10.yaml", *folder_sets(image_folder)) == 1
    assert lines_of(capsys, "error:") == [
        f"error: data.test_dir '{image_folder / 'test'}' has classes ['airplane', 'boat', 'cat'] "
        f"but data.train_dir '{image_folder / 'train'}' has ['airplane', 'cat', 'ship']; they "
        "must be the same"
    ]
    for split in ("train", "test"):
        for cls in os.listdir(image_folder / split):
            if cls != "airplane":
                shutil.rmtree(image_folder / split / cls)
    sets = folder_sets(
        image_folder, validate_with_classifier="{type: categorical, vals: [false, true]}"
    )
    sets += ["searcher.metric=validation_loss", "searcher.smaller_is_better=true"]
    assert check("const-cifar10.yaml", *sets) == 1
    assert lines_of(capsys, "error:") == [
        "error: searcher.metric='validation_loss': with "
        "hyperparameters.validate_with_classifier=true the searcher and checkpoint_policy choose "
        "by holdout_accuracy, which its validation reports for that; test-split accuracies are "
        "reported, never used to choose (at validate_with_classifier=true)",
    ]
    sets[-2:] = []  # the metric of validate_with_classifier=true: the class rule is next
    assert check("const-cifar10.yaml", *sets) == 1
    assert lines_of(capsys, "error:") == [
        "error: searcher.metric='holdout_accuracy': with "
        "hyperparameters.validate_with_classifier=false the searcher and checkpoint_policy "
        "choose by validation_loss, which its validation reports for that; test-split "
        "accuracies are reported, never used to choose (at validate_with_classifier=false)",
        "error: the labeled training images have 1 class(es) (['airplane']); the linear probe "
        "needs at least 2. Add class folders or set hyperparameters.validate_with_classifier="
        "false (at validate_with_classifier=true)",
    ]


def test_unlabeled_images_alone_are_checked_and_the_searcher_told_what_to_set(
    image_folder, tmp_path, capsys
):
    """A flat folder as data.unlabeled_dir: its images counted (every one, labels not read),
    and a searcher still on the classifier's metric refused in one line saying what to set."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((image_folder / "train").rglob("*.png")):
        shutil.copy(path, flat / f"{path.parent.name}-{path.name}")
    sets = [
        "hyperparameters.dataset_name=image_folder",
        f"data.unlabeled_dir={flat}",
        "hyperparameters.global_batch_size={type: categorical, vals: [8, 32]}",
    ]
    assert check("const-cifar10.yaml", *sets) == 1
    assert lines_of(capsys, "error:") == [
        "error: searcher.metric='holdout_accuracy': no labeled images (dataset_name=image_folder "
        "with only data.unlabeled_dir): validation reports validation_loss; set "
        "searcher.metric=validation_loss and searcher.smaller_is_better=true (at all 2 points)"
    ]
    sets += ["searcher.metric=validation_loss", "searcher.smaller_is_better=true"]
    assert check("const-cifar10.yaml", *sets) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"note: data.unlabeled_dir='{flat}': 24 images, labels not read" in out
    assert [line for line in out if line.startswith("error:")] == [
        "error: the training set has 24 images, fewer than one global batch (32); lower "
        "hyperparameters.global_batch_size (at global_batch_size=32)"
    ]


@pytest.mark.parametrize(
    "config,dataset,write,first_file",
    [
        ("const-cifar10.yaml", "cifar10", write_cifar10, "data_batch_1"),
        ("distributed-stl10.yaml", "stl10", write_stl10, "train_X.bin"),
    ],
)
def test_download_dir_holds_the_dataset_or_it_is_downloaded_at_start(
    config, dataset, write, first_file, tmp_path, capsys
):
    assert check(config, download_dir=tmp_path) == 0
    assert (
        f"note: data.download_dir='{tmp_path}' does not hold {dataset} here (no {first_file}): "
        "a trial downloads it at start where it is missing"
    ) in capsys.readouterr().out.splitlines()
    write(str(tmp_path))  # the real archive's file names and layout
    assert check(config, download_dir=tmp_path) == 0
    assert (
        f"note: data.download_dir='{tmp_path}' holds {dataset} here: a run here opens it "
        "without downloading"
    ) in capsys.readouterr().out.splitlines()


def test_gcs_locations_are_checked_without_reading_them(monkeypatch, image_folder, capsys):
    """Against the emulator: a shard index that exists, one that does not, an empty folder."""
    with FakeGCS() as server:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.host)
        bucket = server.client().create_bucket("byol-check")
        bucket.blob("shards/index.json").upload_from_string(b"{}")
        sets = folder_sets(image_folder) + [
            "data.train_dir=gs://byol-check/shards/index.json",
            "data.test_dir=gs://byol-check/gone/index.json",
            "data.unlabeled_dir=gs://byol-check/unlabeled",
        ]
        assert check("const-cifar10.yaml", *sets) == 1
        out = capsys.readouterr().out.splitlines()
        assert (
            "note: data.train_dir='gs://byol-check/shards/index.json': the shard index exists "
            "(checked here, not read)"
        ) in out
        assert [line for line in out if line.startswith("error:")] == [
            "error: data.test_dir='gs://byol-check/gone/index.json': the shard index does not "
            "exist",
            "error: data.unlabeled_dir='gs://byol-check/unlabeled': the folder holds no objects",
        ]
        # Nothing was downloaded: only metadata was asked for (GET .../o/NAME without alt=media).
        assert not [p for _, p in server.proxy.requests if "alt=media" in p]
        sets[-3:] = ["data.train_dir=gs://byol-check/empty", "data.test_dir=gs://byol-check/shards"]
        assert check("const-cifar10.yaml", *sets) == 1
        assert lines_of(capsys, "error:") == [
            "error: data.train_dir='gs://byol-check/empty': the folder holds no objects"
        ]


def test_gcs_without_credentials_is_a_note(image_folder, capsys):
    sets = folder_sets(image_folder) + ["data.train_dir=gs://byol-check/shards/index.json"]
    assert check("const-cifar10.yaml", *sets) == 0
    (note,) = [line for line in capsys.readouterr().out.splitlines() if "gs://" in line]
    assert note.startswith(
        "note: data.train_dir='gs://byol-check/shards/index.json' not checked here: no Google "
        "Cloud credentials found"
    )


# ---------------------------------------------------------------------------------------------
# The master's schemas, and bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not os.path.isfile(preflight.MASTER_SCHEMA_CHECKER),
    reason="needs Determined's expconf schemas in ../shared/tools/expconf",
)
def test_what_the_master_refuses_is_reported_first(tmp_path, capsys):
    bad_range = "hyperparameters.learning_rate={type: log, base: 10, minval: 1, maxval: -1}"
    sets = ("searcher.max_trials=0", bad_range)
    assert check("search-cifar10.yaml", *sets, download_dir=tmp_path) == 1
    assert lines_of(capsys, ("error:", "failed:")) == [
        "error: the master refuses the config: <config>.hyperparameters.learning_rate: minval "
        "must be less than maxval",
        "error: the master refuses the config: <config>.searcher.max_trials: 0 is less than the "
        "minimum of 1",
        "failed: 2 problems, 0 hyperparameter points checked",
    ]


def test_without_the_master_schemas_the_search_space_is_still_checked(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr(preflight, "MASTER_SCHEMA_CHECKER", str(tmp_path / "no-check.py"))
    bad_range = "hyperparameters.learning_rate={type: log, base: 10, minval: 1, maxval: -1}"
    assert check("search-cifar10.yaml", bad_range, download_dir=tmp_path) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "note: the master's own schema check (Determined's expconf schemas) is not here: the "
        "master checks the config's other parts at `det experiment create`",
        "error: hyperparameters.learning_rate: minval=1 must be less than maxval=-1",
        "failed: 1 problem, 0 hyperparameter points checked",
    ]


def test_bad_command_lines_are_one_line(tmp_path, capsys):
    assert check(str(tmp_path / "nope.yaml")) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"error: config file '{tmp_path / 'nope.yaml'}' does not exist",
        "failed: 1 problem, 0 hyperparameter points checked",
    ]
    for argv in (
        ["--check"],
        [os.path.join(ROOT, "const-cifar10.yaml"), "--check", "--resume", "x"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            model_def.main(argv)
        assert exit_info.value.code == (
            "error: --check takes an experiment config yaml (and --set), not --resume"
        )


def test_a_step_too_big_for_the_named_gpu_is_warned_with_the_largest_batch_that_fits(
    tmp_path, capsys
):
    """--gpu-memory 2GB on const-cifar10.yaml (ResNet-18, CIFAR stem, 256 images a GPU, bf16):
    one warning line, exit status still 0; the batch it names fits 2 GiB with the CUDA reserve
    and one 5% larger does not, by memory.py's own estimate."""
    import memory
    from config import load_config, parse_hparams

    argv = [os.path.join(ROOT, "const-cifar10.yaml"), "--check", "--gpu-memory", "2GB"]
    argv += ["--set", f"data.download_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exit_info:
        model_def.main(argv)
    assert exit_info.value.code == 0
    (warning,) = lines_of(capsys, "warning:")
    found = re.fullmatch(
        r"warning: a training step of resnet18 at 32 px with 256 images a GPU is expected to "
        r"need (\d+\.\d) GiB plus about 1 GiB for CUDA \(memory.py, estimated without a GPU\), "
        r"more than --gpu-memory 2 GiB: the largest per-GPU batch that fits is (\d+) "
        r"\(global_batch_size (\d+) over 1 slot\)",
        warning,
    )
    assert found, warning
    hp = parse_hparams(load_config(os.path.join(ROOT, "const-cifar10.yaml"))["hyperparameters"])
    peak = memory.step_peak_bytes(hp, 256, torch.bfloat16)
    assert found.group(1) == f"{peak / 2**30:.1f}"
    largest = int(found.group(2))
    assert int(found.group(3)) == largest
    assert memory.fits(memory.step_peak_bytes(hp, largest, torch.bfloat16), 2 << 30)
    assert not memory.fits(
        memory.step_peak_bytes(hp, largest * 21 // 20 + 1, torch.bfloat16), 2 << 30
    )
    # An 80 GB GPU holds it: no warning.
    argv[3] = "80GB"
    with pytest.raises(SystemExit):
        model_def.main(argv)
    assert lines_of(capsys, "warning:") == []


def test_a_gpu_memory_that_is_no_size_is_refused_in_one_line(capsys):
    config = os.path.join(ROOT, "const-cifar10.yaml")
    for argv, message in (
        (
            [config, "--check", "--gpu-memory", "80"],
            "error: --gpu-memory '80': give the GPU's memory as a number and GB, e.g. 80GB",
        ),
        ([config, "--gpu-memory", "80GB"], "error: --gpu-memory goes with --check"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            model_def.main(argv)
        assert exit_info.value.code == message
