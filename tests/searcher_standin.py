"""Determined 0.38.1's adaptive ASHA searcher and the experiment's handling of its actions, ported
line for line from the master's Go source (github.com/determined-ai/determined, tag v0.38.1),
for the stand-in cluster (tests/cluster.py):
  - master/pkg/searcher/asha_stopping.go: the rungs, the ranking of each validation, the stop of
    a trial outside the top 1/divisor, and an early exit (trialExitedEarly: an errored or
    canceled trial is inserted at its current rung with ashaExitedMetricValue, MaxFloat64);
  - master/pkg/searcher/adaptive_asha.go: the brackets (makeBrackets, getBracketMaxTrials,
    getBracketMaxConcurrentTrials), each an asha_stopping search, run as a tournament
    (master/pkg/searcher/tournament.go);
  - master/pkg/searcher/searcher.go: the searcher's own record (TrialsRequested, TrialsClosed,
    Failures, Cancels) and its Shutdown once every requested trial has closed;
  - master/internal/experiment.go: TrialReportValidation hands each validation to the searcher;
    handleSearcherActions puts the experiment in STOPPING_ERROR on any searcher error (a NaN,
    infinite or missing searcher metric: getMetric's float64 assertion fails on the strings
    "NaN" and "Infinity" the harness sends) and ignores all but Shutdown actions while the
    experiment is stopping; trialExited reports an errored or canceled trial's early exit to
    the searcher (trialReportEarlyExit) and then its exit, and a COMPLETED trial only its exit
    (master/internal/trial.go, transition: exit(nil)), so neither det.InvalidHP nor a clean
    exit reaches ASHA's InvalidHP branch.
What it does not know it refuses (Unmodelled): hyperparameter sampling (the test supplies each
created trial's values: the master's nprand sampler is not ported), searchers other than
adaptive_asha, a snapshot or restore, and a trial created after the search stopped.
"""

import bisect
import dataclasses
import math
import sys
from typing import Any, Callable, Dict, List, Optional

# asha_stopping.go: const ashaExitedMetricValue = math.MaxFloat64
ASHA_EXITED_METRIC_VALUE = sys.float_info.max

# master/pkg/model: model.StoppingToTerminalStates
STOPPING_TO_TERMINAL = {
    "STOPPING_COMPLETED": "COMPLETED",
    "STOPPING_CANCELED": "CANCELED",
    "STOPPING_KILLED": "CANCELED",
    "STOPPING_ERROR": "ERROR",
}


class Unmodelled(Exception):
    """Something the master does that this port does not model: the test must fail."""


class SearcherError(Exception):
    """An error a Go search method returns (e.g. getMetric's), which errors the experiment."""


@dataclasses.dataclass(frozen=True)
class Create:
    request_id: int


@dataclasses.dataclass(frozen=True)
class Stop:
    request_id: int


@dataclasses.dataclass(frozen=True)
class Shutdown:
    failure: bool = False
    cancel: bool = False


@dataclasses.dataclass
class Rung:
    units_needed: int
    metrics: List[List[Any]] = dataclasses.field(default_factory=list)  # [request id, metric]

    def insert_metric(self, request_id: int, metric: float) -> int:
        """rung.insertMetric: sort.Search for the first metric >= this one, insert there."""
        index = bisect.bisect_left([m for _, m in self.metrics], metric)
        self.metrics.insert(index, [request_id, metric])
        return index


def make_rungs(num_rungs: int, divisor: float, max_length: int) -> List[Rung]:
    """asha_stopping.go, makeRungs."""
    return [
        Rung(max(int(float(max_length) / math.pow(divisor, num_rungs - i - 1)), 1))
        for i in range(num_rungs)
    ]


def _go_float64(value: Any) -> Optional[float]:
    """`value.(float64)` on a structpb value decoded by AsMap: every JSON number is a float64;
    a string ("NaN", "Infinity"), a bool or a missing value is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class AsyncHalvingStopping:
    """asha_stopping.go, asyncHalvingStoppingSearch."""

    def __init__(self, config: Dict[str, Any], smaller_is_better: bool, metric: str):
        self.num_rungs, self.divisor = config["num_rungs"], config["divisor"]
        self.max_trials = config["max_trials"]
        self.max_concurrent_trials = config["max_concurrent_trials"]
        self.time_metric = config["time_metric"]
        self.smaller_is_better, self.metric = smaller_is_better, metric
        self.rungs = make_rungs(self.num_rungs, self.divisor, config["max_time"])
        self.trial_rungs: Dict[int, int] = {}
        self.early_exit_trials: Dict[int, bool] = {}
        self.trials_completed = 0
        self.invalid_trials = 0

    def initial_trials(self, new_create: Callable[[], Create]) -> List[Any]:
        if self.max_concurrent_trials > 0:
            count = min(self.max_concurrent_trials, self.max_trials)
        else:
            count = min(max(1, int(math.pow(self.divisor, self.num_rungs - 1))), self.max_trials)
        return [new_create() for _ in range(count)]

    def trial_created(self, request_id: int) -> List[Any]:
        self.trial_rungs[request_id] = 0
        return []

    def trial_exited(self, request_id: int) -> List[Any]:
        self.trials_completed += 1
        return []

    def validation_completed(
        self, new_create: Callable[[], Create], request_id: int, metrics: Dict[str, Any]
    ) -> List[Any]:
        time_step, value = self.get_metric(metrics)
        ops = self.do_early_stopping(request_id, time_step, value)
        all_trials = len(self.trial_rungs) - self.invalid_trials
        if ops and all_trials < self.max_trials:
            ops.append(new_create())
        return ops

    def get_metric(self, metrics: Dict[str, Any]):
        searcher_metric = _go_float64(metrics.get(self.metric))
        if searcher_metric is None:
            raise SearcherError(
                f"error parsing searcher metric ({self.metric}) from validation metrics: {metrics}"
            )
        if not self.smaller_is_better:
            searcher_metric *= -1
        step = _go_float64(metrics.get(self.time_metric))
        if step is None:
            raise SearcherError(
                f"error parsing searcher time metric ({self.time_metric}) in validation "
                f"metrics: {metrics}"
            )
        return int(step), searcher_metric

    def do_early_stopping(self, request_id: int, time_step: int, metric: float) -> List[Any]:
        for r in range(self.trial_rungs[request_id], self.num_rungs):
            rung = self.rungs[r]
            self.trial_rungs[request_id] = r
            if time_step < rung.units_needed:
                return []
            insert_index = rung.insert_metric(request_id, metric)
            if r == self.num_rungs - 1:
                return [Stop(request_id)]
            num_continue = max(int(len(rung.metrics) / self.divisor), 1)
            if insert_index >= num_continue:
                return [Stop(request_id)]
        return []

    def trial_exited_early(
        self, new_create: Callable[[], Create], request_id: int, reason: str
    ) -> List[Any]:
        if reason in ("INVALID_HP", "INIT_INVALID_HP"):
            self.early_exit_trials[request_id] = True
            self.invalid_trials += 1
            for rung in self.rungs[: self.trial_rungs[request_id] + 1]:
                rung.metrics = [m for m in rung.metrics if m[0] != request_id]
            return [Stop(request_id), new_create()]
        self.early_exit_trials[request_id] = True
        self.rungs[self.trial_rungs[request_id]].insert_metric(request_id, ASHA_EXITED_METRIC_VALUE)
        if len(self.trial_rungs) - self.invalid_trials < self.max_trials:
            return [new_create()]
        return []


def make_brackets(config: Dict[str, Any]) -> List[Dict[str, int]]:
    """adaptive_asha.go, makeBrackets (bracket_rungs unset)."""
    if config.get("bracket_rungs"):
        raise Unmodelled("searcher.bracket_rungs")
    divisor = float(config["divisor"])
    max_rungs = min(
        config["max_rungs"],
        int(math.log(float(config["max_time"])) / math.log(divisor)) + 1,
        int(math.log(float(config["max_trials"])) / math.log(divisor)) + 1,
    )
    rungs = {
        "conservative": list(range(1, max_rungs + 1)),
        "standard": list(range((max_rungs - 1) // 2 + 1, max_rungs + 1)),
        "aggressive": [max_rungs],
    }[config["mode"]]
    rungs.sort(reverse=True)
    # getBracketMaxTrials
    weights = [math.pow(divisor, n - 1) / n for n in rungs]
    trials = [max(int(w / sum(weights) * config["max_trials"]), 1) for w in weights]
    trials[0] += max(config["max_trials"] - sum(trials), 0)
    # getBracketMaxConcurrentTrials
    concurrent, remainder = config.get("max_concurrent_trials") or 0, 0
    if concurrent == 0:
        each = max(trials[-1], int(divisor))
    else:
        concurrent = max(concurrent, len(rungs))
        each, remainder = divmod(concurrent, len(rungs))
    return [
        {
            "num_rungs": n,
            "max_trials": trials[i],
            "max_concurrent_trials": each + (1 if i < remainder else 0),
        }
        for i, n in enumerate(rungs)
    ]


class AdaptiveASHASearcher:
    """adaptive_asha.go's tournament of asha_stopping brackets (tournament.go), inside
    searcher.go's Searcher. `sample()` gives each created trial's hyperparameter values."""

    def __init__(self, searcher: Dict[str, Any], sample: Callable[[], Dict[str, Any]]):
        if searcher["name"] != "adaptive_asha":
            raise Unmodelled(f"searcher {searcher['name']}")
        self.sample = sample
        self.brackets = [
            AsyncHalvingStopping(
                dict(bracket, **{k: searcher[k] for k in ("divisor", "time_metric", "max_time")}),
                searcher["smaller_is_better"],
                searcher["metric"],
            )
            for bracket in make_brackets(searcher)
        ]
        self.trial_table: Dict[int, int] = {}  # tournament.go, TrialTable
        self.hparams: Dict[int, Dict[str, Any]] = {}
        self.requested = 0
        self.created: Dict[int, bool] = {}
        self.closed: Dict[int, bool] = {}
        self.exits: Dict[int, bool] = {}
        self.cancels: Dict[int, bool] = {}
        self.failures: Dict[int, bool] = {}

    def _create_in(self, bracket: int) -> Callable[[], Create]:
        def new_create() -> Create:
            request_id = len(self.trial_table) + 1
            self.trial_table[request_id] = bracket  # tournament.go, markCreates
            self.hparams[request_id] = self.sample()
            return Create(request_id)

        return new_create

    def _record(self, ops: List[Any]) -> List[Any]:
        self.requested += sum(isinstance(op, Create) for op in ops)
        return ops

    def initial_trials(self) -> List[Any]:
        ops = []
        for i, bracket in enumerate(self.brackets):
            ops += bracket.initial_trials(self._create_in(i))
        return self._record(ops)

    def trial_created(self, request_id: int) -> List[Any]:
        self.created[request_id] = True
        return self._record(self.brackets[self.trial_table[request_id]].trial_created(request_id))

    def validation_completed(self, request_id: int, metrics: Dict[str, Any]) -> List[Any]:
        i = self.trial_table[request_id]
        try:
            ops = self.brackets[i].validation_completed(self._create_in(i), request_id, metrics)
        except SearcherError as e:
            raise SearcherError(
                f"error while handling a validation completed event: {request_id}: {e}"
            ) from None
        return self._record(ops)

    def _shutdown_if_all_closed(self, ops: List[Any], cancel: bool) -> List[Any]:
        if self.requested == len(self.closed):
            ops.append(
                Shutdown(
                    failure=len(self.failures) >= self.requested,
                    cancel=cancel and len(self.cancels) >= self.requested,
                )
            )
        return ops

    def trial_exited_early(self, request_id: int, reason: str) -> List[Any]:
        if self.exits.get(request_id):
            return []
        if reason == "USER_CANCELED":
            self.cancels[request_id] = True
        elif reason == "ERRORED":
            self.failures[request_id] = True
        i = self.trial_table[request_id]
        ops = self.brackets[i].trial_exited_early(self._create_in(i), request_id, reason)
        self.exits[request_id] = True
        return self._shutdown_if_all_closed(self._record(ops), cancel=False)

    def trial_exited(self, request_id: int) -> List[Any]:
        self.closed[request_id] = True
        ops = self.brackets[self.trial_table[request_id]].trial_exited(request_id)
        return self._shutdown_if_all_closed(self._record(ops), cancel=True)

    def rung_of(self, request_id: int) -> Rung:
        """The rung the trial is at (TrialRungs) in its bracket."""
        bracket = self.brackets[self.trial_table[request_id]]
        return bracket.rungs[bracket.trial_rungs[request_id]]


class ExperimentStandIn:
    """experiment.go's handling of the searcher's actions for one experiment. `create_trial`
    (request id, hyperparameter values) adds the trial to the cluster; `stop_trial(request id)`
    is PatchSearcherState's stop (the trial's state only, trial.go)."""

    STOPPING = ("STOPPING_COMPLETED", "STOPPING_CANCELED", "STOPPING_KILLED", "STOPPING_ERROR")

    def __init__(
        self,
        searcher: AdaptiveASHASearcher,
        create_trial: Callable[[int, Dict[str, Any]], None],
        stop_trial: Callable[[int], None],
    ):
        self.searcher, self.create_trial, self.stop_trial = searcher, create_trial, stop_trial
        self.state = "ACTIVE"
        self.reasons: List[str] = []  # why the state changed, as the master's log says it
        self.trials: Dict[int, bool] = {}  # e.trials: the trials not yet exited

    def start(self) -> None:
        self.handle(self.searcher.initial_trials())

    def _update_state(self, state: str, reason: str) -> None:
        self.state = state
        self.reasons.append(reason)
        self._maybe_terminate()

    def _maybe_terminate(self) -> None:
        """canTerminate, then stop(): a stopping experiment with no trial left ends."""
        if self.state in self.STOPPING and not self.trials:
            self.state = STOPPING_TO_TERMINAL[self.state]

    def handle(self, actions: List[Any], error: Optional[Exception] = None) -> None:
        """handleSearcherActions."""
        if self.state in self.STOPPING and not all(isinstance(a, Shutdown) for a in actions):
            return
        if error is not None:
            self._update_state("STOPPING_ERROR", f"encountered error {error}")
            return
        for action in actions:
            if isinstance(action, Create):
                if self.state != "ACTIVE":
                    raise Unmodelled("a trial created while the experiment is not active")
                self.create_trial(action.request_id, self.searcher.hparams[action.request_id])
                self.trials[action.request_id] = True
                self.handle(self.searcher.trial_created(action.request_id))
            elif isinstance(action, Stop):
                if action.request_id in self.trials:
                    self.stop_trial(action.request_id)
            elif action.failure:
                self._update_state("STOPPING_ERROR", "hp search failed")
            elif action.cancel:
                self._update_state("STOPPING_CANCELED", "hp search canceled")
            else:
                self._update_state("STOPPING_COMPLETED", "hp search completed")

    def validation(self, request_id: int, metrics: Dict[str, Any]) -> None:
        """TrialReportValidation."""
        try:
            ops = self.searcher.validation_completed(request_id, metrics)
        except SearcherError as e:
            self.handle([], e)
            return
        self.handle(ops)

    def trial_exited(self, request_id: int, end_state: str) -> None:
        """trial.go's transition to a terminal state (exit(Errored) for ERROR,
        exit(UserCanceled) for CANCELED, exit(nil) otherwise), then experiment.go's trialExited."""
        reason = {"ERROR": "ERRORED", "CANCELED": "USER_CANCELED"}.get(end_state)
        if reason is not None:
            self.handle(self.searcher.trial_exited_early(request_id, reason))
        self.trials.pop(request_id, None)
        self.handle(self.searcher.trial_exited(request_id))
        self._maybe_terminate()
