"""`python model_def.py CONFIG --check`: the corner points of a search space (hpspace.py, against
hand-worked values)."""

import itertools

import pytest

import hpspace
from config import ConfigError

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
