"""The corner points of a Determined hyperparameter search space.

`model_def.py CONFIG --check` (preflight.py) validates a config at the ends of every range the
searcher may sample; this module says which values those are, how they combine into points, and
what a trial receives at one point. Plain functions of the `hyperparameters` section, no I/O.

The forms, as Determined 0.38.1 reads and samples them (the master's expconf schemas,
master/pkg/searcher/hyperparameters.go and grid.go):
  a plain value, or {type: const, val}   that value
  {type: int, minval, maxval}            an integer in [minval, maxval], both ends included
  {type: double, minval, maxval}         a number in [minval, maxval)
  {type: log, minval, maxval, base}      base ** (a number in [minval, maxval))
  {type: categorical, vals: [...]}       one of vals
  a map without `type`                   nested hyperparameters, each of these forms
The grid searcher takes `count` evenly spaced values from minval to maxval instead (both ends;
count 1: only the midpoint, an int's rounded half away from zero as Go's math.Round does).
"""

import itertools
import math
from typing import Any, Dict, List, Sequence, Tuple

from config import ConfigError

# A hyperparameter's keys from the `hyperparameters` section down (nested ones have several).
Path = Tuple[str, ...]
# Every hyperparameter with its corner values: one for a constant, the ends of a range, every
# value of a categorical.
Space = Dict[Path, List[Any]]
# One point: a corner value for each searched hyperparameter (those with several corners).
Point = Dict[Path, Any]

RANGE_TYPES = ("int", "double", "log")
# Each form's required keys and its optional ones (besides `type`).
FORMS = {
    "const": (("val",), ()),
    "int": (("minval", "maxval"), ("count",)),
    "double": (("minval", "maxval"), ("count",)),
    "log": (("minval", "maxval", "base"), ("count",)),
    "categorical": (("vals",), ()),
}

# Above this many points in the full product of the corners, the points cover every pair of
# hyperparameters at all their corner combinations instead (see corner_points).
PRODUCT_LIMIT = 4096


def dotted(path: Path) -> str:
    return ".".join(path)


def corners(hyperparameters: Dict[str, Any], grid: bool = False, prefix: Path = ()) -> Space:
    """The corner values of every hyperparameter of the section (a nested one by its path), in
    the section's order; equal values of a categorical once. `grid`: the searcher is `grid`.
    A malformed search space raises ConfigError naming the hyperparameter."""
    if not isinstance(hyperparameters, dict):
        raise ConfigError(f"hyperparameters must be a mapping, got {hyperparameters!r}")
    space: Space = {}
    for name, spec in hyperparameters.items():
        path = prefix + (name,)
        if isinstance(spec, dict) and "type" in spec:
            space[path] = _distinct(_form_corners(spec, "hyperparameters." + dotted(path), grid))
        elif isinstance(spec, dict):
            space.update(corners(spec, grid, path))
        else:
            space[path] = [spec]
    return space


def _form_corners(spec: Dict[str, Any], name: str, grid: bool) -> List[Any]:
    kind = spec["type"]
    if kind not in FORMS:
        raise ConfigError(f"{name}: type {kind!r} is not one of: {', '.join(FORMS)}")
    required, optional = FORMS[kind]
    missing = [key for key in required if key not in spec]
    if missing:
        raise ConfigError(f"{name} (type: {kind}) needs {', '.join(missing)}")
    unknown = sorted(set(spec) - {"type", *required, *optional})
    if unknown:
        raise ConfigError(
            f"{name} (type: {kind}) has unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(('type',) + required + optional)}"
        )
    if kind == "const":
        return [spec["val"]]
    if kind == "categorical":
        if not isinstance(spec["vals"], list) or not spec["vals"]:
            raise ConfigError(f"{name}.vals={spec['vals']!r} must be a non-empty list")
        return spec["vals"]
    low, high = _bounds(spec, name, kind)
    count = spec.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(f"{name}.count={count!r} must be an integer >= 1")
    ends = [low, high]
    if grid:
        if count is None:
            raise ConfigError(
                f"{name}: grid search needs count (how many values, minval to maxval)"
            )
        if kind == "int":
            count = min(count, high - low + 1)  # no more values than integers in the range
        ends = [(low + high) / 2] if count == 1 else ends
    if kind == "int":
        return [int(_round_half_away(end)) for end in ends]
    if kind == "log":
        return [float(spec["base"]) ** end for end in ends]
    return [float(end) for end in ends]


def _bounds(spec: Dict[str, Any], name: str, kind: str) -> Tuple[Any, Any]:
    numbers = (int,) if kind == "int" else (int, float)
    what = "an integer" if kind == "int" else "a number"
    for key in FORMS[kind][0]:
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, numbers) or not math.isfinite(value):
            raise ConfigError(f"{name}.{key}={value!r} must be {what} (type: {kind})")
    if kind == "log" and spec["base"] <= 0:
        raise ConfigError(f"{name}.base={spec['base']!r} must be a number > 0")
    if not spec["minval"] < spec["maxval"]:
        raise ConfigError(
            f"{name}: minval={spec['minval']!r} must be less than maxval={spec['maxval']!r}"
        )
    return spec["minval"], spec["maxval"]


def _round_half_away(value: float) -> float:
    """Go's math.Round: halves away from zero (Python's round() goes to the even neighbour)."""
    return math.copysign(math.floor(abs(value) + 0.5), value)


def _distinct(values: List[Any]) -> List[Any]:
    """Values in order, each once; 1, 1.0 and true stay apart (a trial tells them apart)."""
    seen, out = set(), []
    for value in values:
        key = (type(value).__name__, repr(value))
        if key not in seen:
            seen.add(key)
            out.append(value)
    return out


def searched(space: Space) -> List[Path]:
    """The hyperparameters with more than one corner value, in the section's order."""
    return [path for path, values in space.items() if len(values) > 1]


def product_size(space: Space) -> int:
    return math.prod(len(values) for values in space.values())


def corner_points(space: Space, limit: int = PRODUCT_LIMIT) -> Tuple[List[Point], bool]:
    """(points, exhaustive): every combination of the corners when there are at most `limit`
    (exhaustive), otherwise points that hold every pair of searched hyperparameters at all
    their corner combinations (all_pairs), each other hyperparameter at one of its corners.
    A space with nothing searched has one point, the empty one."""
    names = searched(space)
    axes = [space[path] for path in names]
    if product_size(space) <= limit or len(axes) < 2:
        rows: Sequence[Sequence[int]] = list(itertools.product(*(range(len(a)) for a in axes)))
        exhaustive = True
    else:
        rows, exhaustive = all_pairs([len(a) for a in axes]), False
    points = [{path: space[path][i] for path, i in zip(names, row)} for row in rows]
    return points, exhaustive


def all_pairs(sizes: Sequence[int]) -> List[Tuple[int, ...]]:
    """Rows of value indices (one per axis, axis k has sizes[k] values) in which every two axes
    meet at every combination of their values: a pairwise covering array, built greedily. Each
    row starts from the first pair not yet covered and gives every other axis the value that
    covers the most new pairs with the axes already set (the lowest index on a tie), so each
    row covers at least one new pair: rows are distinct and the loop ends."""
    uncovered = {
        (a, i, b, j)
        for a, b in itertools.combinations(range(len(sizes)), 2)
        for i in range(sizes[a])
        for j in range(sizes[b])
    }

    def pair(axis_a: int, value_a: int, axis_b: int, value_b: int) -> Tuple[int, int, int, int]:
        return (
            (axis_a, value_a, axis_b, value_b)
            if axis_a < axis_b
            else (axis_b, value_b, axis_a, value_a)
        )

    rows = []
    while uncovered:
        a, i, b, j = min(uncovered)
        row = {a: i, b: j}
        for axis in range(len(sizes)):
            if axis not in row:
                row[axis] = max(
                    range(sizes[axis]),
                    key=lambda v: (
                        sum(pair(k, row[k], axis, v) in uncovered for k in row),
                        -v,
                    ),
                )
        values = tuple(row[k] for k in range(len(sizes)))
        uncovered -= {pair(x, values[x], y, values[y]) for x, y in itertools.combinations(row, 2)}
        rows.append(values)
    return rows


def hparams_at(
    hyperparameters: Dict[str, Any], space: Space, point: Point, prefix: Path = ()
) -> Dict[str, Any]:
    """The hyperparameters a trial receives at `point` (info.trial.hparams): nested maps as
    maps, every hyperparameter at its value in `point` or its single corner, numbers as the
    master hands them over."""
    out = {}
    for name, spec in hyperparameters.items():
        path = prefix + (name,)
        if isinstance(spec, dict) and "type" not in spec:
            out[name] = hparams_at(spec, space, point, path)
        else:
            out[name] = as_master_sends(point[path] if path in point else space[path][0])
    return out


def as_master_sends(value: Any) -> Any:
    """A value as it reaches a trial: the master holds hyperparameters as JSON numbers (Go's
    float64), so a whole number arrives as an int (1.0 -> 1), as Go's encoder writes it below
    1e21; everything else as it is."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, list):
        return [as_master_sends(v) for v in value]
    if isinstance(value, dict):
        return {k: as_master_sends(v) for k, v in value.items()}
    return value


def describe(point: Point) -> str:
    """'learning_rate=0.1, augmentation.view1.blur_prob=0.5': a point's values, short."""
    return ", ".join(f"{dotted(path)}={_short(value)}" for path, value in point.items())


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "null"
    return str(value)
