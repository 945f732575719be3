"""The stand-in's port of Determined 0.38.1's adaptive ASHA and the experiment's handling of it
(tests/searcher_standin.py), checked against the master's own Go tests
(master/pkg/searcher/asha_stopping_test.go, TestMakeRungs) and against what its source says
happens to an errored trial, a NaN or missing searcher metric, and a trial that exits cleanly
after its validation. No training runs here."""

import pytest

from searcher_standin import (
    ASHA_EXITED_METRIC_VALUE,
    AdaptiveASHASearcher,
    ExperimentStandIn,
    Unmodelled,
    make_brackets,
    make_rungs,
)

SEARCHER = {
    "name": "adaptive_asha",
    "metric": "holdout_accuracy",
    "smaller_is_better": False,
    "time_metric": "epochs",
    "max_time": 2,
    "max_trials": 4,
    "max_concurrent_trials": 4,
    "divisor": 2,
    "mode": "aggressive",
    "max_rungs": 3,
}


@pytest.mark.parametrize(
    "num_rungs,max_time,divisor,units",
    # asha_stopping_test.go, TestMakeRungs: its four cases.
    [
        (3, 9, 3.0, [1, 3, 9]),
        (4, 10, 2.0, [1, 2, 5, 10]),
        (1, 9, 3.0, [9]),
        (3, 900, 3.0, [100, 300, 900]),
    ],
)
def test_rungs_are_the_masters(num_rungs, max_time, divisor, units):
    assert [r.units_needed for r in make_rungs(num_rungs, divisor, max_time)] == units


def test_search_cifar10_brackets_are_the_readmes():
    """search-cifar10.yaml's brackets as docs/cluster.md works them out from adaptive_asha.go."""
    brackets = make_brackets(
        dict(SEARCHER, max_time=100, max_trials=16, divisor=4, mode="standard", max_rungs=3)
    )
    assert [(b["num_rungs"], b["max_trials"]) for b in brackets] == [(3, 12), (2, 4)]


def experiment(sampled=None):
    trials, stopped = {}, []
    values = iter(sampled or [{"learning_rate": 0.1 * i} for i in range(1, 9)])
    search = ExperimentStandIn(
        AdaptiveASHASearcher(SEARCHER, lambda: next(values)),
        lambda request_id, hparams: trials.setdefault(request_id, hparams),
        stopped.append,
    )
    search.start()
    return search, trials, stopped


def test_a_nan_or_missing_searcher_metric_errors_the_experiment():
    """getMetric's float64 assertion fails on the string the harness sends for NaN, and on a
    missing metric: handleSearcherActions puts the experiment in STOPPING_ERROR."""
    for metrics in ({"holdout_accuracy": "NaN", "epochs": 1}, {"epochs": 1}):
        search, trials, stopped = experiment()
        assert sorted(trials) == [1, 2, 3, 4]
        search.validation(1, metrics)
        assert search.state == "STOPPING_ERROR"
        assert search.reasons[0].startswith("encountered error error while handling a validation")
        # The searcher still ranks later validations, but a stopping experiment ignores its
        # actions (here ASHA's stop at the top rung).
        search.validation(2, {"holdout_accuracy": 0.5, "epochs": 2})
        assert search.searcher.brackets[0].rungs[1].metrics == [[2, -0.5]] and stopped == []


def test_an_errored_trial_is_ranked_worst_at_its_rung_and_a_clean_exit_only_closes():
    """trialExitedEarly (Errored): MaxFloat64 at the trial's rung; no replacement once
    max_trials were created. A COMPLETED trial (exit(nil)) only closes. The search then shuts
    down: an errored trial among others is no failure of the search."""
    search, trials, stopped = experiment()
    search.validation(1, {"holdout_accuracy": 0.5, "epochs": 1})  # first at rung 0: goes on
    search.validation(2, {"holdout_accuracy": 0.0, "epochs": 2})  # the worst: stopped there
    assert stopped == [2]
    search.trial_exited(2, "COMPLETED")
    search.trial_exited(3, "ERROR")
    rung = search.searcher.brackets[0].rungs[0]
    assert rung.metrics == [[1, -0.5], [2, -0.0], [3, ASHA_EXITED_METRIC_VALUE]]
    assert sorted(trials) == [1, 2, 3, 4] and search.state == "ACTIVE"
    search.trial_exited(1, "COMPLETED")
    search.trial_exited(4, "COMPLETED")
    assert search.state == "COMPLETED" and search.reasons == ["hp search completed"]


def test_what_the_port_does_not_know_is_refused():
    with pytest.raises(Unmodelled):
        AdaptiveASHASearcher(dict(SEARCHER, name="random"), dict)
    with pytest.raises(Unmodelled):
        make_brackets(dict(SEARCHER, bracket_rungs=[2]))
