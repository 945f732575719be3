"""The guard against a non-finite training step, without a host sync per step.

As torch.amp.GradScaler does it: each step's finiteness is a flag on the device, a non-finite
step's update (LARS and the EMA) is skipped there, and the first such step is recorded there.
The host reads the record only where it already waits for the device (a progress line, a
metrics report, which comes before every checkpoint) and stops the run with one line.

Locally that line is NonFiniteLossError's. On a cluster (issue 30) a diverged trial is stopped
once, ranked last, and the search goes on; what the Determined 0.38.1 master does, from its
source (github.com/determined-ai/determined, tag v0.38.1):
  - A process that fails (exit != 0) is restarted under max_restarts (master/internal/trial.go,
    handleAllocationExit); a divergence is deterministic, so every restart would diverge again.
    A trial whose processes all exit 0 without a preemption is a user-requested stop
    (master/internal/task/allocation.go, calculateExitStatus) and ends COMPLETED (trial.go,
    handleAllocationExit): `transition` then calls exit(nil), and the experiment tells the
    searcher TrialExited, not TrialExitedEarly (master/internal/experiment.go, trialExited),
    so ASHA counts it completed and creates no replacement for it. det.InvalidHP ends it the
    same way (COMPLETED, exit(nil)) but also starts InvalidHPKillDelay (10 s, trial.go,
    SetUserInitiatedEarlyExit), after which a trial still tearing down is killed (ERROR or
    CANCELED): a plain exit 0 has no such race, so that is the diverged trial's exit.
  - ASHA ranks a trial only by its validations (master/pkg/searcher/asha_stopping.go,
    validationCompleted): getMetric reads the searcher metric as a float64, and a NaN or an
    infinity (sent as the strings "NaN", "Infinity": determined/util.py's json encoder), or a
    missing metric, is an error that puts the whole experiment in STOPPING_ERROR
    (experiment.go, handleSearcherActions). So before it exits, a diverged trial reports one
    validation whose searcher metric is that metric's finite worst value (worst_validation).
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from optim import flat_view, per_tensor, where_each


class NonFiniteLossError(RuntimeError):
    pass


class TrialDiverged(Exception):
    """On a cluster, raised on every slot once the diverged trial's line is logged and its worst
    validation reported: run_on_cluster ends the trial there with exit 0 (no checkpoint)."""


@dataclasses.dataclass(frozen=True)
class NonFiniteStep:
    """A slot's record of its first non-finite step."""

    step: int  # optimizer steps done before it
    loss: float  # its loss (NaN or infinite, or finite where only a gradient was not)
    loss_before: Optional[float]  # the slot's last finite loss before it; None: none


def agreed(records: List[Optional[NonFiniteStep]]) -> Optional[NonFiniteStep]:
    """Every slot's record (from an allgather, so every slot computes the same): the earliest
    non-finite step; its last finite loss is the mean over the slots that saw that step of
    theirs, the loss of the global batch as the training metrics average it. None: all finite."""
    seen = [r for r in records if r is not None]
    if not seen:
        return None
    step = min(r.step for r in seen)
    first = [r for r in seen if r.step == step]
    before = [r.loss_before for r in first if r.loss_before is not None]
    loss = sum(r.loss for r in first) / len(first)
    return NonFiniteStep(step, loss, sum(before) / len(before) if before else None)


# The range each searcher metric (config.HELD_OUT_METRICS) can take: the probe's accuracy is a
# fraction; the BYOL loss is two terms of 2 - 2 cos (byol.byol_loss), each in [0, 4]. A
# diverged trial reports the end of the range that its searcher ranks last: a value any
# trained trial can only equal, never be worse than, finite so that ASHA can rank it.
METRIC_RANGES = {"holdout_accuracy": (0.0, 1.0), "validation_loss": (0.0, 8.0)}


def worst_value(metric: str, smaller_is_better: bool) -> float:
    low, high = METRIC_RANGES[metric]
    return high if smaller_is_better else low


def worst_validation(
    metric: str, smaller_is_better: bool, searcher: Any, batches: int, epochs: int, step: int
) -> Dict[str, Any]:
    """The one validation a diverged trial reports: the searcher metric's worst value, nothing
    that cannot be computed from a diverged model (no accuracies, no kNN), and its lengths.
    `metric`, `smaller_is_better`: the run's held-out metric (config.HELD_OUT_METRICS, which the
    searcher must use); `searcher`: config.Searcher, for its time_metric and max_time.

    The length ASHA reads (searcher.time_metric) is searcher.max_time: a diverged trial's score
    is final, the worst at any length it could have reached. ASHA inserts a validation into
    the trial's current rung only if its length reaches that rung's (asha_stopping.go,
    doEarlyStopping: `timeStep < rung.UnitsNeeded` returns without ranking it); the trial does
    not know its bracket's rungs, and max_time reaches every rung. There, the worst value ranks
    it last and ASHA stops it, as it stops any trial outside the top 1/divisor; the first
    trial to arrive at a rung always continues in ASHA, and then the worst value is ranked at
    the rungs above too, where it only makes room for the trials that arrive after it.
    `batches` and `epochs` are reported as Determined's Trainer reports them, except the one
    that time_metric names."""
    metrics: Dict[str, Any] = {
        metric: worst_value(metric, smaller_is_better),
        "batches": batches,
        "epochs": epochs,
        "diverged_at_step": step,
    }
    if searcher.time_metric is not None and searcher.max_time is not None:
        metrics[searcher.time_metric] = searcher.max_time
    return metrics


def non_finite_metrics(metrics: Dict[str, Any]) -> List[str]:
    """The names of the validation metrics that are numeric scalars (Python, NumPy or 0-dim
    arrays, as Determined converts tensors) but not finite."""

    def non_finite(value: Any) -> bool:
        array = np.asarray(value)
        numeric = array.ndim == 0 and np.issubdtype(array.dtype, np.number)
        return bool(numeric and not np.isfinite(array))

    return sorted(name for name, value in metrics.items() if non_finite(value))


def all_finite(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a 0-dim bool on their device: from
    one concatenation and its sum (in float64, which no sum of float32 values overflows; it is
    NaN or infinite exactly when an element is, inf - inf being NaN), a few kernels however many
    tensors; or, where passes over memory cost more than ops (optim.PER_TENSOR_DEVICES), from
    each tensor's largest |element| (NaN where one is NaN), without the copy."""
    if per_tensor(tensors):
        return torch.isfinite(torch.stack(torch._foreach_norm(tensors, math.inf))).all()
    flat = torch.cat([flat_view(t) for t in tensors])
    return torch.isfinite(flat.sum(dtype=torch.float64))


def zero_unless(flag: torch.Tensor, tensors: List[torch.Tensor]) -> None:
    """Zeroes every tensor where the 0-dim bool `flag` is false, without reading it on the
    host: one select over their concatenation, or one fill per tensor (PER_TENSOR_DEVICES)."""
    if per_tensor(tensors):
        zero = ~flag
        for t in tensors:
            t.masked_fill_(zero, 0.0)
        return
    views = [flat_view(t) for t in tensors]
    flat = torch.cat(views)
    torch._foreach_copy_(views, torch.where(flag, flat, 0.0).split([v.numel() for v in views]))


class NonFiniteGuard:
    def __init__(self, device: torch.device):
        full = lambda value, dtype=torch.float32: torch.full((), value, dtype=dtype, device=device)
        self.first_step = full(-1, torch.int64)  # the first non-finite step; -1: none yet
        self.first_loss = full(math.nan)  # its loss
        self.loss_before = full(math.nan)  # the last finite loss before it (NaN: none)
        self.last_finite_loss = full(math.nan)

    @staticmethod
    @torch.no_grad()
    def before_step(buffers: List[torch.Tensor]) -> List[torch.Tensor]:
        """A copy of the network's floating-point buffers (BatchNorm's running statistics)
        before the step's forward pass updates them; screen() puts it back if the step is not
        finite. (A diverging run overflows the running variances a step or more before the loss
        itself goes non-finite, since the loss normalises its inputs: left there, every later
        validation and every checkpoint after it would hold an infinite variance.)"""
        return torch._foreach_mul(buffers, 1.0) if buffers else []

    @torch.no_grad()
    def screen(
        self,
        loss: torch.Tensor,
        grads: List[torch.Tensor],
        step: int,
        buffers: List[torch.Tensor] = (),
        saved: List[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The step's flag (0-dim bool: loss, every gradient and every buffer finite), computed
        on the device. A non-finite step's gradients are zeroed, so the skipped update stays
        finite, its buffers are put back as `saved` (before_step) held them, and the first such
        step is recorded."""
        loss = loss.detach()
        finite = torch.isfinite(loss) & all_finite(grads)
        if buffers:
            finite = finite & all_finite(list(buffers))
            torch._foreach_copy_(list(buffers), where_each(finite, list(buffers), list(saved)))
        zero_unless(finite, grads)
        first = ~finite & (self.first_step < 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.first_loss = torch.where(first, loss, self.first_loss)
        self.loss_before = torch.where(first, self.last_finite_loss, self.loss_before)
        self.last_finite_loss = torch.where(finite, loss, self.last_finite_loss)
        return finite

    def first(self) -> Optional[NonFiniteStep]:
        """This slot's first non-finite step, if any. Reads the device: call it only where the
        host waits for the device anyway."""
        step = int(self.first_step)
        if step < 0:
            return None
        before: Optional[float] = float(self.loss_before)
        if math.isnan(before):
            before = None
        return NonFiniteStep(step, float(self.first_loss), before)

    def check(self, batches_per_epoch: int) -> None:
        """Raise NonFiniteLossError if a step was not finite (reads the device, as first())."""
        record = self.first()
        if record is None:
            return
        step, before = record.step, record.loss_before
        raise NonFiniteLossError(
            f"non-finite training step (loss {record.loss}: the loss, a gradient or a BatchNorm "
            f"statistic overflowed) at step {step} (epoch "
            f"{step // batches_per_epoch}); last finite loss: {before}. Training stopped before "
            f"this step's update; no checkpoint was written from this state. Lower "
            f"hyperparameters.learning_rate or check the input data."
        )
