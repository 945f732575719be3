"""The searcher's stop, as a Determined 0.38.1 master gives it to a running trial.

When ASHA stops a trial, the 0.38.1 master sets the trial's state to STOPPING_COMPLETED
(master/internal/trial.go, PatchSearcherState) and sends the trial nothing: `transition` signals
the allocation only for STOPPING_CANCELED, STOPPING_KILLED and STOPPING_ERROR, so no preemption
arrives. The master makes that decision while it handles the validation report (ReportTrialMetrics
calls the searcher before it answers), so after each validation the chief reads its own trial's
state with the trial's session, and every slot learns the answer from the chief.
"""

from typing import Any, Optional

from determined.common.api import bindings


class SearcherStop:
    def __init__(self, core_context: Any, trial_id: Optional[int]):
        """`trial_id`: the trial's id on a cluster; None off-cluster (nothing to ask)."""
        self.core_context = core_context
        self.trial_id = trial_id
        self.pending = False  # a validation was reported since the last question

    def validated(self) -> None:
        """Called on every slot after each validation."""
        self.pending = self.trial_id is not None

    def stop_requested(self) -> bool:
        """True on every slot when the master has stopped this trial; asked once per validation,
        at the same batch on every slot (it is a collective call)."""
        if not self.pending:
            return False
        self.pending = False
        distributed = self.core_context.distributed
        stopped = None
        if distributed.rank == 0:
            # The core context's session: the trial's own allocation token.
            trial = bindings.get_GetTrial(self.core_context._session, trialId=self.trial_id).trial
            stopped = trial.state == bindings.trialv1State.STOPPING_COMPLETED
        return bool(distributed.broadcast(stopped))
