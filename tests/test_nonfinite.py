"""What a diverged trial reports and how its slots agree (nonfinite.py), checked against the
BYOL loss itself and against what the slots record."""

import math

import numpy as np
import pytest
import torch

import byol
import nonfinite
from config import HELD_OUT_METRICS, Searcher
from nonfinite import NonFiniteStep


def test_the_worst_values_are_the_ends_of_what_each_metric_can_be():
    """The BYOL loss of a prediction opposite to its target is its upper end (and an exact
    match its lower one); an accuracy is a fraction. Each searcher metric's worst end is the
    one its smaller_is_better ranks last."""
    torch.manual_seed(0)
    p = torch.randn(16, 8)
    # Each view's prediction regresses the other view's target: both opposite.
    assert float(byol.byol_loss(torch.cat([p, p]), torch.cat([-p, -p]))) == pytest.approx(
        nonfinite.METRIC_RANGES["validation_loss"][1], abs=1e-5
    )
    assert float(byol.byol_loss(torch.cat([p, p]), torch.cat([p, p]))) == pytest.approx(
        nonfinite.METRIC_RANGES["validation_loss"][0], abs=1e-5
    )
    worst = {
        m: nonfinite.worst_value(m, smaller)
        for modes in HELD_OUT_METRICS.values()
        for m, smaller in modes.items()
    }
    assert worst == {"holdout_accuracy": 0.0, "validation_loss": 8.0}


def test_the_worst_validation_reaches_every_rung_through_the_time_metric():
    searcher = Searcher("adaptive_asha", "holdout_accuracy", False, "epochs", 100)
    assert nonfinite.worst_validation("holdout_accuracy", False, searcher, 40, 5, 39) == {
        "holdout_accuracy": 0.0,
        "batches": 40,
        "epochs": 100,
        "diverged_at_step": 39,
    }
    single = Searcher("single", "validation_loss", True, None, None)
    assert nonfinite.worst_validation("validation_loss", True, single, 40, 5, 39)["epochs"] == 5


def test_non_finite_metrics_finds_numpy_and_python_values_alike():
    metrics = {
        "a": np.float32("nan"),
        "b": np.array(float("inf")),
        "c": -math.inf,
        "d": 0.5,
        "e": np.float64(2.0),
        "f": "text",
        "g": [float("nan")],  # not a scalar: not Determined's concern either
    }
    assert nonfinite.non_finite_metrics(metrics) == ["a", "b", "c"]


def test_the_slots_agree_on_the_earliest_step_and_the_mean_losses():
    records = [
        NonFiniteStep(7, math.inf, 2.0),
        None,
        NonFiniteStep(5, 3.0, 1.0),
        NonFiniteStep(5, 5.0, None),
        NonFiniteStep(5, 4.0, 2.0),
    ]
    assert nonfinite.agreed(records) == NonFiniteStep(5, 4.0, 1.5)
    assert nonfinite.agreed([None, None]) is None
    assert nonfinite.agreed([NonFiniteStep(0, math.nan, None)]).loss_before is None
