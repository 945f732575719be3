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


# Both ways the guard's selects run: per tensor (a CPU's, optim.PER_TENSOR_DEVICES) and over
# one concatenation (a GPU's), each run here on CPU tensors.
STRATEGIES = {"per tensor": ("cpu",), "concatenated": ()}


@pytest.fixture(params=sorted(STRATEGIES))
def strategy(request, monkeypatch):
    import optim

    monkeypatch.setattr(optim, "PER_TENSOR_DEVICES", STRATEGIES[request.param])
    return request.param


def screened(grads, buffers, loss):
    """NonFiniteGuard.screen of float32 gradients and buffers: (flag, the gradients after,
    the guard)."""
    grads = [torch.tensor(g, dtype=torch.float32) for g in grads]
    buffers = [torch.tensor(b, dtype=torch.float32) for b in buffers]
    guard = nonfinite.NonFiniteGuard(torch.device("cpu"))
    saved = guard.before_step(buffers)
    flag = guard.screen(torch.tensor(loss), grads, 7, buffers, saved)
    return bool(flag), [g.tolist() for g in grads], guard


@pytest.mark.parametrize(
    "grads,buffers,loss,finite",
    [
        ([[1.0, -2.0], [3e30]], [[1.0, 2.0]], 1.0, True),  # large but finite: no false alarm
        ([[1.0, float("nan")], [3.0]], [[1.0, 2.0]], 1.0, False),  # one gradient element
        ([[1.0, 2.0], [float("-inf")]], [[1.0, 2.0]], 1.0, False),
        ([[float("inf"), float("-inf")], [1.0]], [[1.0]], 1.0, False),  # inf - inf in a sum
        ([[1.0, 2.0], [3.0]], [[1.0, float("inf")]], 1.0, False),  # a BatchNorm statistic
        ([[1.0, 2.0], [3.0]], [[1.0, 2.0]], float("nan"), False),  # the loss
    ],
)
def test_the_guard_flags_a_step_exactly_when_something_is_not_finite(
    strategy, grads, buffers, loss, finite
):
    """A finite step keeps its gradients; any non-finite loss, gradient element or buffer
    element flags it, zeroes its gradients (so LARS's multiplicative skip stays finite) and is
    recorded as the first non-finite step. The flag never reads the host."""
    flag, after, guard = screened(grads, buffers, loss)
    assert flag is finite
    if finite:
        as_float32 = [torch.tensor(g, dtype=torch.float32).tolist() for g in grads]
        assert after == as_float32 and guard.first() is None
    else:
        assert after == [[0.0] * len(g) for g in grads]
        record = guard.first()
        assert record.step == 7 and (math.isnan(record.loss) or record.loss == loss)


def test_a_flagged_steps_buffers_are_put_back(strategy):
    buffers = [torch.tensor([1.0, 2.0])]
    guard = nonfinite.NonFiniteGuard(torch.device("cpu"))
    saved = guard.before_step(buffers)
    buffers[0].copy_(torch.tensor([5.0, float("inf")]))  # the forward pass overflowed it
    flag = guard.screen(torch.tensor(1.0), [torch.tensor([1.0])], 0, buffers, saved)
    assert not bool(flag) and buffers[0].tolist() == [1.0, 2.0]


def test_a_skipped_ema_step_leaves_the_target_bit_identical_and_an_applied_one_moves_it(strategy):
    """byol.ema_update_ with the step's flag: false keeps every bit of the target (channels-last
    tensors too), true moves it as the unconditional fused step does."""
    torch.manual_seed(0)
    online = [torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last), torch.randn(5)]
    target = [torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last), torch.randn(5)]
    kept = [t.clone() for t in target]
    byol.ema_update_(target, online, 0.99, torch.tensor(False))
    assert all(torch.equal(t, k) for t, k in zip(target, kept))
    expected = [k + 0.01 * (o - k) for k, o in zip(kept, online)]
    byol.ema_update_(target, online, 0.99, torch.tensor(True))
    assert all(torch.allclose(t, e, rtol=0, atol=1e-7) for t, e in zip(target, expected))
    assert target[0].is_contiguous(memory_format=torch.channels_last)
