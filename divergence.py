"""What a BYOL run does once training goes non-finite (nonfinite.py's guard finds it).

Locally the run stops with NonFiniteLossError's one line. On a cluster the trial ends once,
ranked last, and its search goes on: every slot logs the same line, the chief reports the
trial's worst validation (nonfinite.worst_validation) and every slot raises TrialDiverged, which
launcher.run_on_cluster turns into exit 0 (nonfinite.py says why, from the master's source).

The host looks only where it waits for the device anyway: after each stretch of training steps,
before Determined reports, validates or checkpoints (FiniteCheck), and after each validation,
before the master sees it (ValidationGuard). So no report or checkpoint holds a non-finite
state, and no NaN reaches the searcher.
"""

import logging
from typing import Any, Dict, Optional, Tuple

from determined import pytorch

import nonfinite
from config import HELD_OUT_METRICS
from nonfinite import NonFiniteLossError, TrialDiverged

logger = logging.getLogger("byol")


class Divergence:
    """The BYOL trial's answer to a non-finite step or validation. It reads the trial's
    progress (steps_done, previous_loss) and its guard (non_finite) when it is asked."""

    def __init__(self, trial: Any):
        self.trial = trial

    def held_out_metric(self) -> Tuple[str, bool]:
        """The metric the searcher ranks by (it must be this one) and its smaller_is_better."""
        ((metric, smaller_is_better),) = HELD_OUT_METRICS[
            self.trial.hp.validate_with_classifier
        ].items()
        return metric, smaller_is_better

    def before_progress_line(self) -> None:
        """Locally a progress line is a wait for the device anyway: check there. On a cluster
        every slot must stop together (only the chief prints), at the report after the
        stretch (FiniteCheck), within one reporting period of the step."""
        if not self.trial.on_cluster:
            self.check_finite()

    def check_finite(self) -> None:
        """Locally: raise NonFiniteLossError if a step so far was not finite (waits for the
        device)."""
        self.trial.non_finite.check(self.trial.batches_per_epoch)

    def stop_if_diverged(self) -> None:
        """On a cluster, on every slot at the same point: whether any slot's step went
        non-finite (one allgather of the slots' records, so all agree on one line)."""
        trial = self.trial
        record = nonfinite.agreed(trial.context.distributed.allgather(trial.non_finite.first()))
        if record is not None:
            self.stop(
                record.step,
                f"step {record.step} went non-finite (its loss: {record.loss:.6g}; the loss, a "
                f"gradient or a BatchNorm statistic overflowed)",
                record.loss_before,
            )

    def stop(self, step: int, what: str, last_finite_loss: Optional[float]) -> None:
        """A diverged trial on a cluster: every slot logs the same line, the chief reports the
        worst validation, and every slot raises TrialDiverged. No checkpoint is written after
        the divergence, so the trial's latest checkpoint is its last finite state."""
        trial, hp = self.trial, self.trial.hp
        metric, smaller_is_better = self.held_out_metric()
        validation = nonfinite.worst_validation(
            metric,
            smaller_is_better,
            trial.run.searcher,
            trial.steps_done,
            trial.steps_done // trial.batches_per_epoch,
            step,
        )
        lr = trial.learning_rate_at(step)
        loss = "none" if last_finite_loss is None else f"{last_finite_loss:.6g}"
        line = (
            f"trial {trial.trial_id} diverged: {what} (epoch {step // trial.batches_per_epoch}), "
            f"learning rate {lr:.6g} at that step (hyperparameters.learning_rate="
            f"{hp.learning_rate:g}); last finite loss: {loss}. Stopped without a "
            f"checkpoint after it, not to be restarted; the searcher ranks it last ({metric} "
            f"{validation[metric]}). Lower hyperparameters.learning_rate and resume from the "
            f"trial's latest checkpoint: model_def.py --resume DIR --allow-config-change --set "
            f"hyperparameters.learning_rate=LOWER (README: 'A trial that diverges')"
        )
        logger.error("%s", line)
        if trial.context.distributed.rank == 0:
            trial.context._core.train.report_validation_metrics(
                steps_completed=trial.steps_done, metrics=validation
            )
        raise TrialDiverged(line)


class FiniteCheck(pytorch.PyTorchCallback):
    """After each stretch of training steps, before Determined reports metrics, validates or
    writes a checkpoint (it reads the metrics from the device there anyway): a non-finite step
    stops the run."""

    def __init__(self, divergence: Divergence):
        self.divergence = divergence

    def on_training_workload_end(self, avg_metrics: Dict[str, Any], batch_metrics: Any) -> None:
        if self.divergence.trial.on_cluster:
            self.divergence.stop_if_diverged()
        else:
            self.divergence.check_finite()


class ValidationGuard(pytorch.PyTorchCallback):
    """No validation reaches the master with a NaN, infinite or missing searcher metric, which
    errors the whole search (nonfinite.py). A model whose training loss stayed finite may still
    validate to NaN (BatchNorm's running statistics overflow in the forward passes of a
    diverging run, and validation uses them): a non-finite held-out metric stops the trial as
    a divergence (the worst validation instead of this one, on a cluster; NonFiniteLossError
    locally). Another metric that is not finite is left out: it cannot be computed.

    Determined's Trainer reports, after this callback, the very dict it passes here (broadcast
    from the chief first over several slots, so every slot decides alike): changes made here
    are what the master gets, and a raise here reports nothing and writes no checkpoint."""

    def __init__(self, divergence: Divergence):
        self.divergence = divergence

    def on_validation_end(self, metrics: Dict[str, Any]) -> None:
        trial = self.divergence.trial
        metric, _ = self.divergence.held_out_metric()
        bad = nonfinite.non_finite_metrics(metrics)
        if metric in bad or metric not in metrics:
            what = f"validation at step {trial.steps_done} gave {metric}={metrics.get(metric)}"
            last = None if trial.previous_loss is None else float(trial.previous_loss)
            if not trial.on_cluster:
                raise NonFiniteLossError(
                    f"{what}; last training loss: {last}. Lower hyperparameters.learning_rate."
                )
            self.divergence.stop(trial.steps_done, what, last)
        for name in bad:
            del metrics[name]
        if bad and trial.context.distributed.rank == 0:
            logger.warning(
                "validation at step %d: %s not finite, left out of the report",
                trial.steps_done,
                ", ".join(bad),
            )
