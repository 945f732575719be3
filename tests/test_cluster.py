"""The cluster path, end to end: experiments created through Determined's SDK, trials started as
an agent starts them (tests/cluster.py says how each piece mirrors Determined 0.38.1), and
Determined's real harness talking to a loopback master stand-in built from its own REST
bindings (tests/master_standin.py). Every assertion is on what that stand-in received or on the
files in the cluster's shared_fs checkpoint storage."""

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
import yaml
from determined.common.api import bindings

import checkpoint
from cluster import SCHEMAS, Cluster
from conftest import ROOT, tiny_config
from slots_reference import TOLERANCE, largest_parameter_difference, reference_training

pytestmark = pytest.mark.skipif(
    not SCHEMAS.is_dir(), reason="needs the master's expconf schemas in ../shared/tools/expconf"
)


def validation_errors(config):
    """../shared/tools/expconf/check.py: the master's own validation of a submitted config."""
    spec = importlib.util.spec_from_file_location("expconf_check", SCHEMAS.parent / "check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    return check.validation_errors(config)


def experiment_config(tmp_path, folder, name="const-cifar10.yaml", **hparams):
    """The shipped config shrunk to seconds (tests/conftest.tiny_config), on an image folder."""
    config = yaml.safe_load(open(tiny_config(tmp_path, **hparams)))
    if name != "const-cifar10.yaml":
        shipped = yaml.safe_load(open(os.path.join(ROOT, name)))
        for key in ("searcher", "name"):
            config[key] = shipped[key]
        for key, value in shipped["hyperparameters"].items():
            if isinstance(value, dict) and "type" in value:
                config["hyperparameters"][key] = value
    config["hyperparameters"]["dataset_name"] = "image_folder"
    config["data"].update(train_dir=str(folder / "train"), test_dir=str(folder / "test"))
    return config


def run(cluster, trial, slots=1, **kwargs):
    """One run of the trial in one container."""
    (result,) = cluster.launch(trial, slots, **kwargs)
    assert cluster.master.refused == [], cluster.master.refused
    return result


def final_state(cluster, trial):
    """The weights and optimizer state of the trial's last checkpoint, from shared_fs."""
    last = max(trial.checkpoints, key=lambda c: c.metadata["steps_completed"])
    return checkpoint.load_state(str(cluster.storage / last.uuid / "state_dict.pth"))


def tensors(state, prefix=""):
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from tensors(value, f"{prefix}/{key}")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from tensors(value, f"{prefix}/{i}")


def largest_difference(a, b):
    """Max |a - b| over every tensor of the models and optimizers; the key sets must match."""
    a = dict(tensors({k: a[k] for k in ("models_state_dict", "optimizers_state_dict")}))
    b = dict(tensors({k: b[k] for k in ("models_state_dict", "optimizers_state_dict")}))
    assert a.keys() == b.keys()
    return max(
        float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """const-cifar10.yaml (shrunk) trained start to end as one trial on one slot."""
    from conftest import write_image_folder

    tmp = tmp_path_factory.mktemp("uninterrupted")
    folder = write_image_folder(tmp / "images")
    with Cluster(tmp) as cluster:
        config = experiment_config(tmp, folder)
        experiment_id = cluster.create_experiment(config)
        trial = cluster.add_trial(experiment_id)
        result = run(cluster, trial)
        yield cluster, config, experiment_id, trial, result, folder


def test_a_trial_lives_its_life_on_the_cluster_path(uninterrupted):
    cluster, config, _, trial, result, _ = uninterrupted
    assert result.returncode == 0, result.stdout[-4000:]
    print("endpoints the harness called:\n  " + "\n  ".join(cluster.master.endpoints()))
    # The master's config form reached the trial: hyperparameters as {type: const, val} maps.
    assert cluster.experiments[1]["config"]["hyperparameters"]["augmentation"]["view1"][
        "blur_prob"
    ] == {"type": "const", "val": 1.0}
    # 24 images, batch 8: 3 steps an epoch, 2 epochs; scheduling_unit 1.
    training = trial.reported("training")
    assert sorted(training) == [1, 2, 3, 4, 5, 6]
    # The resolved value reached the schedule: tau at step 0 is tau_base (the paper's formula).
    assert training[1]["tau"] == config["hyperparameters"]["tau_base"] == 0.99
    validation = trial.reported("validation")
    assert sorted(validation) == [3, 6]
    for metrics in validation.values():
        assert {config["searcher"]["metric"], "test_accuracy", "knn_accuracy"} <= set(metrics)
    # Checkpoints in the shared_fs storage, reported with their steps; progress reaches 1.
    assert [c.metadata["steps_completed"] for c in trial.checkpoints] == [3, 6]
    for reported in trial.checkpoints:
        folder = cluster.storage / reported.uuid
        assert (
            json.loads((folder / "metadata.json").read_text())["steps_completed"]
            == reported.metadata["steps_completed"]
        )
        assert {"state_dict.pth", "byol_checkpoint.json"} <= set(reported.resources)
        assert (folder / "byol_checkpoint.json").is_file()
    assert trial.progress[-1] == 1.0 and trial.progress == sorted(trial.progress)


@pytest.fixture(scope="module")
def one_container(tmp_path_factory):
    """const-cifar10.yaml (shrunk) as one trial in one container: `one_container(slots)` runs
    it once per slot count and returns (cluster, trial, result, image folder)."""
    from conftest import write_image_folder

    runs = {}
    with contextlib.ExitStack() as stack:

        def run_with(slots):
            if slots not in runs:
                tmp = tmp_path_factory.mktemp(f"one_container_{slots}_slots")
                folder = write_image_folder(tmp / "images")
                cluster = stack.enter_context(Cluster(tmp))
                experiment_id = cluster.create_experiment(experiment_config(tmp, folder))
                trial = cluster.add_trial(experiment_id)
                runs[slots] = cluster, trial, run(cluster, trial, slots=slots), folder
            return runs[slots]

        yield run_with


@pytest.mark.multiprocess
def test_two_slots_on_the_cluster_path(one_container):
    """The launcher starts two workers (torch.distributed, gloo); the chief reports."""
    cluster, trial, result, folder = one_container(2)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "[rank=1]" in result.stdout
    assert sorted(trial.reported("training")) == [1, 2, 3, 4, 5, 6]
    assert sorted(trial.reported("validation")) == [3, 6]
    # Each slot's 4 images through its own BatchNorm, the gradients averaged: what
    # slots_reference computes in one process (the trial's seed is 0, as there). The weights
    # after 6 steps to slots_reference.TOLERANCE (which says why that).
    losses, weights = reference_training(
        experiment_config(folder.parent, folder)["hyperparameters"], folder, 2, steps=6
    )
    assert trial.reported("training")[1]["loss"] == pytest.approx(losses[0], rel=1e-6)
    difference = largest_parameter_difference(
        final_state(cluster, trial)["models_state_dict"][0], weights
    )
    assert difference <= TOLERANCE, difference
    assert [c.metadata["steps_completed"] for c in trial.checkpoints] == [3, 6]
    assert trial.progress[-1] == 1.0


@pytest.mark.multiprocess
@pytest.mark.parametrize("slots", [1, 2], ids=["2x1", "2x2"])
def test_two_containers_join_through_the_rendezvous_and_train_as_one(one_container, slots):
    """Two agents with `slots` slots each: each container asks the master's rendezvous, learns
    both addresses and its own rank, and runs determined.launch.torch_distributed (torchrun
    with --nnodes 2); the result is that of one container with all the slots, weights and
    optimizer. With profiling.enabled, Determined's profiler reports each agent's system
    metrics."""
    single_cluster, single_trial, _, folder = one_container(2 * slots)
    tmp = folder.parent / f"two_containers_{slots}_slots"
    tmp.mkdir()
    profiled_agents = set()
    both_profiled = threading.Event()

    def hold_until_both_agents_profiled(cluster, call):
        # The profiler runs in the first process of each container and ships one report per
        # ten 1-second samples: the chief's first progress report waits for both, so a fast
        # run cannot end before them.
        if call.route == "post_ReportTrialMetrics" and call.body.group == "cpu":
            profiled_agents.update(call.body.metrics.metrics.avgMetrics)
            if profiled_agents >= {"agent-0", "agent-1"}:
                both_profiled.set()
        if call.route == "post_ReportTrialProgress":
            both_profiled.wait(timeout=120)

    with Cluster(tmp) as cluster:
        cluster.on_call = hold_until_both_agents_profiled
        config = experiment_config(tmp, folder)
        config["resources"]["slots_per_trial"] = 2 * slots
        config["profiling"] = {"enabled": True}
        assert validation_errors(config) == []
        experiment_id = cluster.create_experiment(config)
        trial = cluster.add_trial(experiment_id)
        results = cluster.launch(trial, slots=slots, containers=2)
        assert cluster.master.refused == [], cluster.master.refused
    for result in results:
        assert result.returncode == 0, result.stdout[-4000:]
    rendezvous = {
        call.params["resourcesId"]: call
        for call in cluster.master.called("get_AllocationRendezvousInfo")
    }
    assert sorted(rendezvous) == ["resources-0", "resources-1"]
    # Each container's rank reached torchrun: the chief's workers are the first ranks.
    for container, result in enumerate(results):
        ranks = {int(r) for r in re.findall(r"^\[rank=(\d+)\]", result.stdout, re.M)}
        assert ranks == set(range(container * slots, (container + 1) * slots))
    assert sorted(trial.reported("training")) == [1, 2, 3, 4, 5, 6]
    assert [c.metadata["steps_completed"] for c in trial.checkpoints] == [3, 6]
    assert profiled_agents == {"agent-0", "agent-1"}
    assert "cpu" not in {m["group"] for m in single_trial.metrics}  # profiling is off there
    difference = largest_difference(
        final_state(cluster, trial), final_state(single_cluster, single_trial)
    )
    print(
        f"2 containers x {slots} slot(s) vs 1 container x {2 * slots} slots: "
        f"largest difference {difference}"
    )
    assert difference <= 1e-6


def test_preemption_checkpoints_exits_and_resumes_to_the_same_weights(
    tmp_path, image_folder, uninterrupted
):
    reference_cluster, _, _, reference_trial, _, _ = uninterrupted

    def preempt_after_step_2(cluster, call):
        body = call.body
        if (
            call.route == "post_ReportTrialMetrics"
            and body.group == "training"
            and body.metrics.stepsCompleted == 2
        ):
            cluster.trials[body.metrics.trialId].preempt.set()

    with Cluster(tmp_path) as cluster:
        cluster.on_call = preempt_after_step_2
        experiment_id = cluster.create_experiment(experiment_config(tmp_path, image_folder))
        trial = cluster.add_trial(experiment_id)
        first = run(cluster, trial)
        assert first.returncode == 0, first.stdout[-4000:]
        assert cluster.master.called("post_AckAllocationPreemptionSignal")
        # The signal arrives by long poll, beside the training loop: the trial acts on it at
        # its next check, after step 2 or step 3, and checkpoints there.
        stopped = max(trial.reported("training"))
        assert stopped in (2, 3)
        assert [c.metadata["steps_completed"] for c in trial.checkpoints] == [stopped]
        # The master reschedules the trial from its latest checkpoint.
        cluster.on_call = lambda cluster, call: None
        latest = trial.checkpoints[-1]
        second = run(cluster, trial, latest_checkpoint=latest.uuid, steps_completed=stopped)
        assert second.returncode == 0, second.stdout[-4000:]
    assert sorted(trial.reported("training")) == [1, 2, 3, 4, 5, 6]
    assert [c.metadata["steps_completed"] for c in trial.checkpoints][-1] == 6
    difference = largest_difference(
        final_state(cluster, trial), final_state(reference_cluster, reference_trial)
    )
    print(
        f"preempted at step {stopped}, resumed: largest weight difference to the uninterrupted run {difference}"
    )
    assert difference == 0.0


def test_a_crashed_trial_restarts_from_its_latest_checkpoint(tmp_path, image_folder, uninterrupted):
    """max_restarts: the node dies right after the step-3 checkpoint is reported; the master
    starts the trial again (run 2) with that checkpoint."""
    reference_cluster, config, _, reference_trial, _, _ = uninterrupted
    assert config["max_restarts"] >= 1

    def die_after_first_checkpoint(cluster, call):
        if call.route == "post_ReportCheckpoint":
            cluster.kill_containers()

    with Cluster(tmp_path) as cluster:
        cluster.on_call = die_after_first_checkpoint
        experiment_id = cluster.create_experiment(experiment_config(tmp_path, image_folder))
        trial = cluster.add_trial(experiment_id)
        crashed = run(cluster, trial)
        assert crashed.returncode != 0
        cluster.on_call = lambda cluster, call: None
        steps_before = len(trial.metrics)
        latest = trial.checkpoints[-1]
        assert latest.metadata["steps_completed"] == 3
        restarted = run(cluster, trial, latest_checkpoint=latest.uuid, steps_completed=3)
        assert restarted.returncode == 0, restarted.stdout[-4000:]
    second_run = [(m["group"], m["steps"]) for m in trial.metrics[steps_before:]]
    assert second_run == [("training", 4), ("training", 5), ("training", 6), ("validation", 6)]
    assert (
        largest_difference(
            final_state(cluster, trial), final_state(reference_cluster, reference_trial)
        )
        == 0.0
    )


@pytest.mark.multiprocess
def test_a_search_trial_that_asha_stops_trains_no_further_batch(tmp_path, image_folder):
    """search-cifar10.yaml shrunk, two slots: ASHA stops the trial at its first validation the
    way a 0.38.1 master does (the state only, no preemption). The chief asks for its trial's
    state after the validation; both slots end before the next batch, with a checkpoint."""
    shipped = yaml.safe_load(open(os.path.join(ROOT, "search-cifar10.yaml")))
    assert validation_errors(shipped) == []
    assert shipped["searcher"]["max_time"] == shipped["hyperparameters"]["epochs"]
    config = experiment_config(tmp_path, image_folder, "search-cifar10.yaml", epochs=2)
    config["searcher"]["max_time"] = 2
    # No checkpoint by policy or period: the one checkpoint is the stop's own.
    config["checkpoint_policy"] = "none"
    config["min_checkpoint_period"] = {"epochs": 0}
    sampled = {"learning_rate": 0.37, "weight_decay": 3e-5, "tau_base": 0.975}

    def asha_stops_at_first_rung(cluster, call):
        # The master's searcher decides while it handles the validation report
        # (ReportTrialMetrics -> TrialReportValidation -> PatchSearcherState), before answering.
        if call.route == "post_ReportTrialMetrics" and call.body.group == "validation":
            cluster.searcher_stops(cluster.trials[call.body.metrics.trialId])

    with Cluster(tmp_path) as cluster:
        cluster.on_call = asha_stops_at_first_rung
        experiment_id = cluster.create_experiment(config)
        trial = cluster.add_trial(experiment_id, sampled)
        result = run(cluster, trial, slots=2)
    assert result.returncode == 0, result.stdout[-4000:]
    # No preemption was sent: every long poll answered false, none acknowledged.
    polls = cluster.master.called("get_AllocationPreemptionSignal")
    assert polls and not cluster.master.called("post_AckAllocationPreemptionSignal")
    stop = next(
        i
        for i, c in enumerate(cluster.master.calls)
        if c.route == "post_ReportTrialMetrics" and c.body.group == "validation"
    )
    after_stop = [
        c.route for c in cluster.master.calls[stop:] if c.route != "get_AllocationPreemptionSignal"
    ]
    print("routes from the validation ASHA stops at:\n  " + "\n  ".join(after_stop))
    # The validation report (the master's searcher stops the trial while handling it), that
    # step's progress report and set_status("training"), then the question; after it only
    # set_status("checkpointing") and the checkpoint: no further batch, no metrics.
    question = after_stop.index("get_GetTrial")
    assert after_stop[0] == "post_ReportTrialMetrics"
    assert "post_ReportTrialMetrics" not in after_stop[1:question]
    assert after_stop[question + 1 :] == ["post_PostTrialRunnerMetadata", "post_ReportCheckpoint"]
    training, validation = trial.reported("training"), trial.reported("validation")
    assert training[1]["tau"] == 0.975  # tau at step 0 is the sampled tau_base
    assert sorted(training) == [1, 2, 3] and sorted(validation) == [3]
    assert validation[3]["epochs"] == 1  # the time_metric ASHA reads
    # Progress by epochs (max_length is 2 epochs): reported after each of the 3 batches.
    assert trial.progress == [0.0, 0.0, 0.5]
    assert [c.metadata["steps_completed"] for c in trial.checkpoints] == [3]
    last = trial.checkpoints[-1]
    load_data = json.loads((cluster.storage / last.uuid / "load_data.json").read_text())
    assert {k: load_data["hparams"][k] for k in sampled} == sampled
    assert "the searcher stopped this trial after step 3" in result.stdout


def test_a_config_error_on_a_cluster_fails_once_as_invalid_hyperparameters(tmp_path, image_folder):
    """A legacy searcher.max_length (which the master still accepts) is refused in the trial:
    Determined's InvalidHP path reports the early exit and exits 0, so the master completes the
    trial instead of restarting it (trial.go, handleAllocationExit: an early exit counts only
    after a clean exit; a failed exit is restarted max_restarts times)."""
    config = experiment_config(tmp_path, image_folder)
    config["searcher"]["max_length"] = {"epochs": 2}
    assert validation_errors(config) == []
    with Cluster(tmp_path) as cluster:
        experiment_id = cluster.create_experiment(config)
        trial = cluster.add_trial(experiment_id)
        result = run(cluster, trial)
    assert result.returncode == 0, result.stdout[-4000:]
    assert trial.early_exits == [bindings.v1TrialEarlyExitExitedReason.INVALID_HP]
    assert trial.metrics == [] and trial.checkpoints == []
    (line,) = [line for line in result.stdout.splitlines() if "invalid config" in line]
    assert "searcher.max_length={'epochs': 2}" in line
    assert "searcher.max_time" in line and "searcher.time_metric: epochs" in line
    assert "Traceback" not in result.stdout


def test_evaluate_result_launches_the_evaluation_of_the_best_checkpoint(uninterrupted, tmp_path):
    """evaluate_result.py --experiment-id against the master: the best checkpoint by
    holdout_accuracy, an evaluation experiment the master accepts, and that experiment's trial
    reading the checkpoint from shared_fs and reporting what a local evaluation computes."""
    import evaluate_result

    cluster, _, experiment_id, trial, _, _ = uninterrupted
    validation = trial.reported("validation")
    best_step = max(validation, key=lambda s: (validation[s]["holdout_accuracy"], -s))
    best = next(c for c in trial.checkpoints if c.metadata["steps_completed"] == best_step)
    known = set(cluster.experiments)
    evaluate_result.main(
        [
            "--experiment-id",
            str(experiment_id),
            "--classifier-train-epochs",
            "2",
            "--master",
            cluster.master.url,
        ]
    )
    (evaluation_id,) = set(cluster.experiments) - known
    submitted = yaml.safe_load(cluster.experiments[evaluation_id]["original"])
    assert validation_errors(submitted) == []
    assert submitted["entrypoint"][:4] == [
        "python3",
        "evaluate_result.py",
        "--checkpoint-uuid",
        best.uuid,
    ]
    assert cluster.master.refused == []

    evaluation = cluster.add_trial(evaluation_id)
    result = run(cluster, evaluation)
    assert result.returncode == 0, result.stdout[-4000:]
    (reported,) = evaluation.reported("validation").values()
    local = subprocess.run(
        [
            sys.executable,
            "evaluate_result.py",
            "--checkpoint",
            str(cluster.storage / best.uuid),
            "--classifier-train-epochs",
            "2",
            "--output",
            str(tmp_path / "local.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    expected = json.loads((tmp_path / "local.json").read_text())
    assert reported["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=1e-9)
    assert reported["holdout_accuracy"] == pytest.approx(expected["holdout_accuracy"], abs=1e-9)


def test_evaluate_result_pictures_come_from_the_master_and_the_evaluations_checkpoint(
    uninterrupted, tmp_path
):
    """--experiment-id with --pictures DIR: curves.png here, drawn from the master's metrics of
    the best checkpoint's trial (what the harness reported); the evaluation's trial stores
    neighbours.png, confusion.png, per_class.csv and embedding.png as a checkpoint at its
    validation's step, the one `det experiment download` fetches (the best by the searcher's
    metric)."""
    import io

    from determined.experimental import client
    from PIL import Image

    import evaluate_result
    import pictures

    cluster, _, experiment_id, trial, _, _ = uninterrupted
    known = set(cluster.experiments)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate_result.main(
            [
                "--experiment-id",
                str(experiment_id),
                "--classifier-train-epochs",
                "2",
                "--no-augment",
                "--master",
                cluster.master.url,
                "--pictures",
                str(tmp_path / "pictures"),
            ]
        )
    (evaluation_id,) = set(cluster.experiments) - known
    submitted = yaml.safe_load(cluster.experiments[evaluation_id]["original"])
    assert validation_errors(submitted) == []
    at = submitted["entrypoint"].index("--pictures")
    assert submitted["entrypoint"][at + 1] == "pictures"
    curves = tmp_path / "pictures" / "curves.png"
    assert f"wrote {curves}\n" in printed.getvalue()
    with Image.open(curves) as image:
        assert (image.format, image.size) == ("PNG", (1200, 1000))
    sdk = client.Determined(master=cluster.master.url, user="determined", password="")
    series = pictures.master_series(sdk, trial.id)
    for group, names in (
        ("training", ("loss", "learning_rate", "tau", "representation_std")),
        ("validation", ("holdout_accuracy", "knn_accuracy")),
    ):
        reported = trial.reported(group)
        for name in names:
            assert series[name] == [(s, reported[s][name]) for s in sorted(reported)], name
    assert cluster.master.called("get_GetMetrics") and cluster.master.refused == []

    evaluation = cluster.add_trial(evaluation_id)
    result = run(cluster, evaluation)
    assert result.returncode == 0, result.stdout[-4000:]
    (stored,) = evaluation.checkpoints
    assert stored.metadata["steps_completed"] == next(iter(evaluation.reported("validation")))
    drawn = {"neighbours.png", "neighbours.csv", "confusion.png", "per_class.csv", "embedding.png"}
    assert drawn <= set(stored.resources)
    assert all((cluster.storage / stored.uuid / name).is_file() for name in drawn)
    assert f"pictures stored as checkpoint {stored.uuid}" in result.stdout
    (best,) = sdk.get_experiment(evaluation_id).list_checkpoints(max_results=1)
    assert best.uuid == stored.uuid


def test_the_stand_in_refuses_what_a_master_would_not_accept(tmp_path):
    """Unknown routes, unknown fields and routes it does not model fail loudly."""
    import requests

    with Cluster(tmp_path) as cluster:
        url = cluster.master.url
        assert requests.get(f"{url}/api/v1/no/such/route").status_code == 404
        assert (
            requests.post(f"{url}/api/v1/trials/1/progress", json={"progres": 0.5}).status_code
            == 400
        )
        assert requests.get(f"{url}/api/v1/models").status_code == 501  # real, but not modelled
        assert cluster.master.calls == []
    assert [line.split(":")[0] for line in cluster.master.refused] == [
        "GET /api/v1/no/such/route",
        "POST /api/v1/trials/1/progress",
        "GET /api/v1/models (get_GetModels)",
    ]
