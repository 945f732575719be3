"""The searcher's stop, as a Determined 0.38.1 master gives it to a running trial.

When ASHA stops a trial, the 0.38.1 master sets the trial's state to STOPPING_COMPLETED
(master/internal/trial.go, PatchSearcherState) and sends the trial nothing: `transition` signals
the allocation only for STOPPING_CANCELED, STOPPING_KILLED and STOPPING_ERROR, so no preemption
arrives. The master decides while it handles the validation report: ReportTrialMetrics
(api_trials.go) first hands the metrics to the searcher, which patches the trial's state, and
only then stores them (AddTrialMetrics), which sets the trial's latest validation, and answers.

The harness posts that report from a background thread and never waits for the answer, so a
question asked right after the validation can reach the master before its decision. The chief
therefore asks for its trial until the trial's latest validation is the one it reported: from
then on the state it reads holds the searcher's decision on that validation. Every slot learns
the answer from the chief, at the same batch.
"""

import logging
import time
from typing import Any, Callable, Dict, Optional

from determined import pytorch
from determined.common.api import bindings

logger = logging.getLogger("byol")

# How long the chief waits for the master to store a validation report before it trains on and
# asks again at the next validation. A master answers in milliseconds; minutes mean it is in
# trouble, and the trial should not stand still for it.
ACKNOWLEDGEMENT_PATIENCE_S = 120.0
FIRST_POLL_S, LONGEST_POLL_S = 0.05, 2.0


class SearcherStop:
    def __init__(
        self,
        core_context: Any,
        trial_id: Optional[int],
        patience_s: float = ACKNOWLEDGEMENT_PATIENCE_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        """`trial_id`: the trial's id on a cluster; None off-cluster (nothing to ask).
        `clock` and `sleep` are the chief's wait between questions (a test passes its own)."""
        self.core_context = core_context
        self.trial_id = trial_id
        self.patience_s, self.clock, self.sleep = patience_s, clock, sleep
        self.validated_step: Optional[int] = None  # a validation not yet asked about

    def validated(self, steps_completed: int) -> None:
        """Called on every slot after each validation, with the step it was made at."""
        if self.trial_id is not None:
            self.validated_step = steps_completed

    def stop_requested(self) -> bool:
        """True on every slot when the master has stopped this trial; asked once per validation,
        at the same batch on every slot (it is a collective call)."""
        if self.validated_step is None:
            return False
        step, self.validated_step = self.validated_step, None
        distributed = self.core_context.distributed
        stopped = self._stopped_after(step) if distributed.rank == 0 else None
        return bool(distributed.broadcast(stopped))

    def exit_if_stopped(self, steps_done: int) -> None:
        """At the start of a training batch: when the searcher has stopped this trial, exit
        the way Determined exits for a preemption (a checkpoint unless the latest is of this
        step, then exit 0). set_stop_requested would be read only at the next reporting
        boundary, after up to scheduling_unit more batches."""
        if self.stop_requested():
            if self.core_context.distributed.rank == 0:
                logger.info("the searcher stopped this trial after step %d: exiting", steps_done)
            raise pytorch._ShouldExit()

    def _stopped_after(self, step: int) -> bool:
        """The chief's question: once the master has stored the validation of `step`, whether
        the trial is STOPPING_COMPLETED. Asked again, with growing pauses, until then."""
        deadline = self.clock() + self.patience_s
        pause = FIRST_POLL_S
        while True:
            # The core context's session: the trial's own allocation token.
            trial = bindings.get_GetTrial(self.core_context._session, trialId=self.trial_id).trial
            latest = trial.latestValidation
            if latest is not None and (latest.totalBatches or 0) >= step:
                return trial.state == bindings.trialv1State.STOPPING_COMPLETED
            if self.clock() >= deadline:
                logger.warning(
                    "the master has not stored the validation of step %d after %.0f s: training "
                    "on, and asking whether the searcher stopped this trial at the next validation",
                    step,
                    self.patience_s,
                )
                return False
            self.sleep(pause)
            pause = min(2 * pause, LONGEST_POLL_S)


class SearcherStopCheck(pytorch.PyTorchCallback):
    """After each validation (on every slot), the next batch first asks whether the searcher
    stopped the trial: the validation reaches the master after this callback returns. The trial
    keeps its SearcherStop as `searcher_stop` and its progress as `steps_done`."""

    def __init__(self, trial: Any):
        self.trial = trial

    def on_validation_end(self, metrics: Dict[str, Any]) -> None:
        self.trial.searcher_stop.validated(self.trial.steps_done)
