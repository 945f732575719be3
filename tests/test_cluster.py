"""The cluster path, end to end: experiments created through Determined's SDK, trials started as
an agent starts them (tests/cluster.py says how each piece mirrors Determined 0.38.1), and
Determined's real harness talking to a loopback master stand-in built from its own REST
bindings (tests/master_standin.py). Every assertion is on what that stand-in received or on the
files in the cluster's shared_fs checkpoint storage."""

import contextlib
import importlib.util
import json
import math
import os
import re
import socket
import threading

import pytest
import torch
import yaml
from determined.common.api import bindings

import checkpoint
import nonfinite
from cluster import SCHEMAS, Cluster, shipped_model_definition
from conftest import ROOT, run_python, tiny_config
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


@pytest.mark.multiprocess
def test_two_slots_on_the_cluster_path(tmp_path, image_folder):
    """The launcher starts two workers (torch.distributed, gloo); the chief reports."""
    folder = image_folder
    with Cluster(tmp_path) as cluster:
        trial = cluster.add_trial(cluster.create_experiment(experiment_config(tmp_path, folder)))
        result = run(cluster, trial, slots=2)
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
def test_two_containers_join_through_the_rendezvous_and_train_as_one(tmp_path, image_folder, slots):
    """Two agents with `slots` slots each, on addresses of their own: each container asks the
    master's rendezvous, learns both addresses (the chief's first) and its own rank, and runs
    determined.launch.torch_distributed (torchrun with --nnodes 2); the result is what all the
    slots compute together, as one process computes it (slots_reference). With
    profiling.enabled (the 2x1 run), Determined's profiler reports each agent's system metrics."""
    profiling = slots == 1
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
        if call.route == "post_ReportTrialProgress" and profiling:
            both_profiled.wait()

    with Cluster(tmp_path) as cluster:
        cluster.on_call = hold_until_both_agents_profiled
        config = experiment_config(tmp_path, image_folder)
        config["resources"]["slots_per_trial"] = 2 * slots
        config["profiling"] = {"enabled": profiling}
        assert validation_errors(config) == []
        experiment_id = cluster.create_experiment(config)
        trial = cluster.add_trial(experiment_id)
        results = cluster.launch(trial, slots=slots, containers=2)
        assert cluster.master.refused == [], cluster.master.refused
    for result in results:
        assert result.returncode == 0, result.stdout[-4000:]
    (allocation,) = cluster.allocations.values()
    chief, other = allocation.containers
    # Both containers asked, and each was answered with both addresses, the chief's first.
    asked = [
        call.params["resourcesId"] for call in cluster.master.called("get_AllocationRendezvousInfo")
    ]
    assert sorted(asked) == sorted([chief.resources_id, other.resources_id])
    info = allocation.rendezvous.info(other.resources_id)
    assert info.addresses == ["127.0.0.2", "127.0.0.3"] and info.slots == [slots, slots]
    # Each container's rank reached torchrun: the chief's workers are the first ranks.
    for container, result in enumerate(results):
        ranks = {int(r) for r in re.findall(r"^\[rank=(\d+)\]", result.stdout, re.M)}
        assert ranks == set(range(container * slots, (container + 1) * slots))
    assert sorted(trial.reported("training")) == [1, 2, 3, 4, 5, 6]
    assert [c.metadata["steps_completed"] for c in trial.checkpoints] == [3, 6]
    assert trial.outcomes == ["COMPLETED"]
    if profiling:
        assert profiled_agents == {"agent-0", "agent-1"}
    else:
        assert "cpu" not in {m["group"] for m in trial.metrics}
    # Each slot's images through its own BatchNorm, the gradients averaged over all 2 x slots:
    # what slots_reference computes in one process. Its TOLERANCE (which says why that) holds
    # for two slots; four reduce their gradients in another order than one process does, so
    # 2 x 2 is compared with 1 x 4, whose gloo reduction is the same.
    losses, weights = reference_training(
        experiment_config(tmp_path, image_folder)["hyperparameters"], image_folder, 2 * slots, 6
    )
    assert trial.reported("training")[1]["loss"] == pytest.approx(losses[0], rel=1e-6)
    final = final_state(cluster, trial)
    if slots == 1:
        difference = largest_parameter_difference(final["models_state_dict"][0], weights)
    else:
        (tmp_path / "one_container").mkdir()
        with Cluster(tmp_path / "one_container") as single:
            single_trial = single.add_trial(single.create_experiment(config))
            assert run(single, single_trial, slots=4).returncode == 0
        difference = largest_difference(final, final_state(single, single_trial))
    print(f"2 containers x {slots} slot(s): largest difference {difference}")
    assert difference <= TOLERANCE, difference


@pytest.mark.multiprocess
def test_a_start_up_problem_on_one_machine_stops_every_machine_with_one_line(tmp_path):
    """The data folder exists on the first agent only (a relative path, in each container's own
    working directory). Every process opens its data and then agrees: both containers exit 0
    with the same line, naming the process and machine that failed and what it saw, before any
    training; each reports the early exit, and the trial ends COMPLETED, never restarted and
    never killed by the master. (Without the agreement the first machine waits in a collective
    for a peer that has left, until the master kills it: ERROR or CANCELED.)"""
    from conftest import write_image_folder

    # Kill only what a broken start-up leaves waiting (the master's 10 s would also catch a
    # clean exit that a loaded machine makes slow).
    with Cluster(tmp_path, invalid_hp_kill_delay_s=120) as cluster:
        config = experiment_config(tmp_path, tmp_path / "unused")
        config["resources"]["slots_per_trial"] = 2
        config["data"].update(train_dir="images/train", test_dir="images/test")
        experiment_id = cluster.create_experiment(config)
        trial = cluster.add_trial(experiment_id)
        # The first agent's container will work in this directory (Cluster.launch).
        write_image_folder(tmp_path / f"container-{trial.id}-1-0" / "workdir" / "images")
        results = cluster.launch(trial, slots=1, containers=2)
        assert cluster.master.refused == [], cluster.master.refused
    (allocation,) = cluster.allocations.values()
    lines = []
    for result in results:
        assert result.returncode == 0, result.stdout[-4000:]
        (line,) = [line for line in result.stdout.splitlines() if "invalid config" in line]
        lines.append(line.split("invalid config: ", 1)[1])
        assert "Traceback" not in result.stdout
    assert lines[0] == lines[1]
    assert lines[0] == (
        f"start-up failed on rank 1 (machine 1, {socket.gethostname()}): image folder "
        f"'images/train' does not exist or is not a directory"
    )
    assert trial.early_exits == [bindings.v1TrialEarlyExitExitedReason.INVALID_HP] * 2
    assert trial.metrics == [] and trial.checkpoints == []
    assert allocation.task_log == [] and trial.outcomes == ["COMPLETED"]


@pytest.mark.multiprocess
def test_a_container_that_dies_before_the_rendezvous_ends_the_allocation(tmp_path, image_folder):
    """The second agent's container dies as its rendezvous starts (a lost node): the master
    crashes the allocation, killing the container that waits for the rendezvous, instead of
    leaving it waiting; the trial's log says which resources failed, and the trial is
    restarted (max_restarts)."""
    with Cluster(tmp_path) as cluster:
        config = experiment_config(tmp_path, image_folder)
        config["resources"]["slots_per_trial"] = 2
        experiment_id = cluster.create_experiment(config)
        trial = cluster.add_trial(experiment_id)
        results = cluster.launch(
            trial,
            slots=1,
            containers=2,
            container_env=[{}, {"STANDIN_DIES_BEFORE_RENDEZVOUS": "1"}],
        )
    (allocation,) = cluster.allocations.values()
    chief, lost = allocation.containers
    assert results[1].returncode == 137 and results[0].returncode != 0
    assert allocation.task_log[:2] == [
        f"crashed: resources {lost.resources_id} exited with code 137",
        f"forcibly killing allocation's remaining resources (reason: resources {lost.resources_id} failed)",
    ]
    assert allocation.rendezvous.exited[0] == lost.resources_id
    assert trial.metrics == [] and trial.outcomes == ["RESTART"]


def test_preemption_checkpoints_exits_and_resumes_to_the_same_weights(
    tmp_path, image_folder, uninterrupted
):
    """The master asks the allocation to stop before the trial's first check (the harness waits
    for the first answer of its preemption long poll before that check, so the step is the same
    on any machine): the trial checkpoints after step 1, mid-epoch, acknowledges and exits 0;
    rescheduled from that checkpoint, it ends with the uninterrupted run's weights, exactly."""
    reference_cluster, _, _, reference_trial, _, _ = uninterrupted

    def preempt_the_first_allocation(cluster, call):
        if call.route == "get_GetTaskContextDirectory" and trial.run_id == 1:
            trial.preempt.set()  # the container has started; its harness has not

    with Cluster(tmp_path) as cluster:
        cluster.on_call = preempt_the_first_allocation
        experiment_id = cluster.create_experiment(experiment_config(tmp_path, image_folder))
        trial = cluster.add_trial(experiment_id)
        first = run(cluster, trial)
        assert first.returncode == 0, first.stdout[-4000:]
        assert cluster.master.called("post_AckAllocationPreemptionSignal")
        assert sorted(trial.reported("training")) == [1]
        assert [c.metadata["steps_completed"] for c in trial.checkpoints] == [1]
        # The master reschedules the trial from its latest checkpoint.
        latest = trial.checkpoints[-1]
        second = run(cluster, trial, latest_checkpoint=latest.uuid, steps_completed=1)
        assert second.returncode == 0, second.stdout[-4000:]
    assert sorted(trial.reported("training")) == [1, 2, 3, 4, 5, 6]
    assert [c.metadata["steps_completed"] for c in trial.checkpoints][-1] == 6
    difference = largest_difference(
        final_state(cluster, trial), final_state(reference_cluster, reference_trial)
    )
    print(
        f"preempted at step 1, resumed: largest weight difference to the uninterrupted run {difference}"
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
    assert trial.outcomes == ["RESTART", "COMPLETED"]
    assert (
        largest_difference(
            final_state(cluster, trial), final_state(reference_cluster, reference_trial)
        )
        == 0.0
    )


@pytest.mark.multiprocess
@pytest.mark.parametrize("master", ["fast", "slow"])
def test_a_search_trial_that_asha_stops_trains_no_further_batch(tmp_path, image_folder, master):
    """search-cifar10.yaml shrunk, two slots: ASHA stops the trial at its first validation the
    way a 0.38.1 master does (the state only, no preemption), deciding while it handles the
    validation report. A slow master decides only after the trial has already asked for its
    state once: the chief asks until the master has stored that validation, and both slots end
    before the next batch, with a checkpoint of the validated step."""
    shipped = yaml.safe_load(open(os.path.join(ROOT, "search-cifar10.yaml")))
    assert validation_errors(shipped) == []
    assert shipped["searcher"]["max_time"] == shipped["hyperparameters"]["epochs"]
    config = experiment_config(tmp_path, image_folder, "search-cifar10.yaml", epochs=2)
    config["searcher"]["max_time"] = 2
    # No checkpoint by policy or period: the one checkpoint is the stop's own.
    config["checkpoint_policy"] = "none"
    config["min_checkpoint_period"] = {"epochs": 0}
    sampled = {"learning_rate": 0.37, "weight_decay": 3e-5, "tau_base": 0.975}
    asked = threading.Event()  # the trial asked for its state since the report arrived

    def asha_stops_at_first_rung(cluster, call):
        if call.route == "get_GetTrial":
            asked.set()
        if call.route == "post_ReportTrialMetrics" and call.body.group == "validation":
            if master == "slow":  # busy: the trial's question comes before the decision
                # A trial that asks until this validation is stored always asks while it is
                # held here; the bound passes only for one that stopped asking (and fails).
                asked.clear()
                asked.wait(timeout=30)
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
    routes = [c.route for c in cluster.master.calls if c.route != "get_AllocationPreemptionSignal"]
    report = next(
        i
        for i, c in enumerate(cluster.master.calls)
        if c.route == "post_ReportTrialMetrics" and c.body.group == "validation"
    )
    after_stop = [
        c.route
        for c in cluster.master.calls[report:]
        if c.route != "get_AllocationPreemptionSignal"
    ]
    print(
        f"{master} master, routes from the validation ASHA stops at:\n  " + "\n  ".join(after_stop)
    )
    # The questions, until one came after the master stored the validation; after the last
    # only set_status("checkpointing") and the checkpoint: no further batch, no metrics.
    questions = [i for i, route in enumerate(routes) if route == "get_GetTrial"]
    assert routes[questions[-1] + 1 :] == ["post_PostTrialRunnerMetadata", "post_ReportCheckpoint"]
    if master == "slow":
        assert len(questions) >= 2  # the first question was answered before the decision
    training, validation = trial.reported("training"), trial.reported("validation")
    assert training[1]["tau"] == 0.975  # tau at step 0 is the sampled tau_base
    assert sorted(training) == [1, 2, 3] and sorted(validation) == [3]
    assert validation[3]["epochs"] == 1  # the time_metric ASHA reads
    # Progress by epochs (max_length is 2 epochs): reported after each of the 3 batches.
    assert trial.progress == [0.0, 0.0, 0.5]
    assert [c.metadata["steps_completed"] for c in trial.checkpoints] == [3]
    assert trial.outcomes == ["COMPLETED"]
    last = trial.checkpoints[-1]
    load_data = json.loads((cluster.storage / last.uuid / "load_data.json").read_text())
    assert {k: load_data["hparams"][k] for k in sampled} == sampled
    assert "the searcher stopped this trial after step 3" in result.stdout


@pytest.mark.multiprocess
def test_a_fine_tuning_search_trial_that_asha_stops_trains_no_further_batch(tmp_path, image_folder):
    """search-finetune-cifar10.yaml shrunk: ASHA stops a fine-tuning trial at its first
    validation as a 0.38.1 master does (the state only, no preemption), and the trial ends
    before its next batch with a checkpoint of the validated step, not at max_length."""
    from conftest import tiny_finetune_config

    shipped = yaml.safe_load(open(os.path.join(ROOT, "search-finetune-cifar10.yaml")))
    assert shipped["searcher"]["name"] == "adaptive_asha"
    config = tiny_finetune_config(tmp_path, image_folder, epochs=2)
    config["searcher"] = dict(shipped["searcher"], max_time=2)
    config["hyperparameters"]["learning_rate"] = shipped["hyperparameters"]["learning_rate"]
    config["checkpoint_policy"] = "none"
    config["min_checkpoint_period"] = {"epochs": 0}
    assert validation_errors(config) == []

    def asha_stops_at_first_rung(cluster, call):
        if call.route == "post_ReportTrialMetrics" and call.body.group == "validation":
            cluster.searcher_stops(cluster.trials[call.body.metrics.trialId])

    with Cluster(tmp_path) as cluster:
        cluster.on_call = asha_stops_at_first_rung
        trial = cluster.add_trial(cluster.create_experiment(config), {"learning_rate": 0.05})
        result = run(cluster, trial)
    assert result.returncode == 0, result.stdout[-4000:]
    assert not cluster.master.called("post_AckAllocationPreemptionSignal")
    # 18 labeled images trained on (6 held out), batch 8: 2 steps an epoch; max_length 2 epochs.
    assert sorted(trial.reported("training")) == [1, 2]
    assert sorted(trial.reported("validation")) == [2]
    assert [c.metadata["steps_completed"] for c in trial.checkpoints] == [2]
    assert trial.outcomes == ["COMPLETED"]
    assert "the searcher stopped this trial after step 2" in result.stdout


def test_a_config_error_on_a_cluster_fails_once_as_invalid_hyperparameters(tmp_path, image_folder):
    """A legacy searcher.max_length (which the master still accepts) is refused in the trial:
    Determined's InvalidHP path reports the early exit and exits 0, so the master completes the
    trial instead of restarting it (trial.go, handleAllocationExit: an early exit counts only
    after a clean exit; a failed exit is restarted max_restarts times)."""
    config = experiment_config(tmp_path, image_folder)
    config["searcher"]["max_length"] = {"epochs": 2}
    assert validation_errors(config) == []
    # The master kills a trial still running 10 s after its early exit; a clean exit needs no
    # such deadline here, where a loaded machine may take longer to tear a process down.
    with Cluster(tmp_path, invalid_hp_kill_delay_s=120) as cluster:
        experiment_id = cluster.create_experiment(config)
        trial = cluster.add_trial(experiment_id)
        result = run(cluster, trial)
    assert result.returncode == 0, result.stdout[-4000:]
    assert trial.early_exits == [bindings.v1TrialEarlyExitExitedReason.INVALID_HP]
    assert trial.metrics == [] and trial.checkpoints == []
    assert trial.outcomes == ["COMPLETED"]  # not restarted; 0.38.1's searcher never replaces it
    (line,) = [line for line in result.stdout.splitlines() if "invalid config" in line]
    assert "searcher.max_length={'epochs': 2}" in line
    assert "searcher.max_time" in line and "searcher.time_metric: epochs" in line
    assert "Traceback" not in result.stdout


def test_evaluate_result_launches_the_evaluation_of_the_best_checkpoint(uninterrupted, tmp_path):
    """evaluate_result.py --experiment-id against the master: the best checkpoint by
    holdout_accuracy, an evaluation experiment the master accepts, and that experiment's trial
    reading the checkpoint from shared_fs and reporting what a local evaluation computes."""

    cluster, _, experiment_id, trial, _, _ = uninterrupted
    validation = trial.reported("validation")
    best_step = max(validation, key=lambda s: (validation[s]["holdout_accuracy"], -s))
    best = next(c for c in trial.checkpoints if c.metadata["steps_completed"] == best_step)
    evaluation_id, submitted = cluster.submit_evaluation(experiment_id)
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
    local = run_python(
        "evaluate_result.py",
        "--checkpoint",
        cluster.storage / best.uuid,
        "--classifier-train-epochs",
        "2",
        "--output",
        tmp_path / "local.json",
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

    import curves

    cluster, _, experiment_id, trial, _, _ = uninterrupted
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluation_id, submitted = cluster.submit_evaluation(
            experiment_id, "--no-augment", "--pictures", str(tmp_path / "pictures")
        )
    assert validation_errors(submitted) == []
    at = submitted["entrypoint"].index("--pictures")
    assert submitted["entrypoint"][at + 1] == "pictures"
    curves_png = tmp_path / "pictures" / "curves.png"
    assert f"wrote {curves_png}\n" in printed.getvalue()
    with Image.open(curves_png) as image:
        assert (image.format, image.size) == ("PNG", (1200, 1000))
    sdk = client.Determined(master=cluster.master.url, user="determined", password="")
    series = curves.master_series(sdk, trial.id)
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


def test_a_fine_tuning_experiment_starts_from_a_pretraining_experiments_best_checkpoint(
    uninterrupted, tmp_path
):
    """finetune-cifar10.yaml with hyperparameters.pretrained.experiment_id, created as `det
    experiment create` creates it: its trial asks the master (with its own session) for the
    pretraining experiment's best checkpoint by holdout_accuracy, reads it from shared_fs and
    trains on it. With the backbone frozen, its checkpoint's backbone is that checkpoint's online
    backbone, weight for weight; the marker records where it came from."""
    from conftest import tiny_finetune_config

    cluster, _, experiment_id, trial, _, folder = uninterrupted
    validation = trial.reported("validation")
    best_step = max(validation, key=lambda s: (validation[s]["holdout_accuracy"], -s))
    best = next(c for c in trial.checkpoints if c.metadata["steps_completed"] == best_step)
    config = tiny_finetune_config(
        tmp_path,
        folder,
        pretrained={"experiment_id": experiment_id},
        backbone_name=None,
        cifar_stem=None,
        image_size=None,
        backbone_lr_scale=0.0,
    )
    assert validation_errors(config) == []
    asked_before = len(cluster.master.called("get_GetExperimentCheckpoints"))
    tuning = cluster.add_trial(cluster.create_experiment(config))
    result = run(cluster, tuning)
    assert result.returncode == 0, result.stdout[-4000:]
    assert tuning.outcomes == ["COMPLETED"]
    assert len(cluster.master.called("get_GetExperimentCheckpoints")) == asked_before + 1
    # 8 training images a class: 2 held out, 6 trained on; batch 8: 2 steps.
    (reported,) = tuning.reported("validation").values()
    assert reported["holdout_images"] == 6 and reported["test_images"] == 12
    assert 0.0 <= reported["holdout_accuracy"] <= 1.0
    (saved,) = tuning.checkpoints
    tuned = checkpoint.load_state(str(cluster.storage / saved.uuid / "state_dict.pth"))
    source = checkpoint.load_state(str(cluster.storage / best.uuid / "state_dict.pth"))
    source = checkpoint.online_backbone_state(source["models_state_dict"][0], "best")
    for name, weight in source.items():
        assert torch.equal(tuned["models_state_dict"][0][f"backbone.{name}"], weight), name
    marker = json.loads((cluster.storage / saved.uuid / checkpoint.MARKER).read_text())
    assert marker["pretrained"] == {
        "kind": "experiment_id",
        "experiment_id": experiment_id,
        "best_by": {"holdout_accuracy": validation[best_step]["holdout_accuracy"]},
        "checkpoint_uuid": best.uuid,
        "steps_completed": best_step,
    }
    assert (cluster.storage / saved.uuid / "labeled_subset.csv").is_file()


@pytest.mark.multiprocess
def test_fine_tuning_on_two_slots_scores_each_held_out_image_once(tmp_path, image_folder):
    """finetune-cifar10.yaml (random init) over 2 slots: the labeled subset is the one a single
    slot trains on (it does not depend on the slot count), each slot takes half of each batch,
    and validation counts every held-out and test image once, however the loader shares them
    out: 6 held-out images of 18 labeled (3 classes x 8, a quarter held out) and the 12 test
    images."""
    from conftest import tiny_finetune_config

    subsets = {}
    for slots in (1, 2):
        (tmp_path / f"slots{slots}").mkdir()
        with Cluster(tmp_path / f"slots{slots}") as cluster:
            config = tiny_finetune_config(tmp_path, image_folder)
            config["resources"]["slots_per_trial"] = slots
            trial = cluster.add_trial(cluster.create_experiment(config))
            result = run(cluster, trial, slots=slots)
        assert result.returncode == 0, result.stdout[-4000:]
        assert trial.outcomes == ["COMPLETED"]
        (reported,) = trial.reported("validation").values()
        assert (reported["holdout_images"], reported["test_images"]) == (6, 12)
        (saved,) = trial.checkpoints
        subsets[slots] = (cluster.storage / saved.uuid / "labeled_subset.csv").read_text()
        if slots == 2:
            assert "[rank=1]" in result.stdout
    assert subsets[1] == subsets[2] and len(subsets[1].splitlines()) == 1 + 18


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


def log_messages(result, needle):
    """Each process's log line holding `needle`, without the launcher's [rank=N] prefix and the
    logger's time stamp: {rank: message}, one line per rank."""
    found = {}
    for line in result.stdout.splitlines():
        if needle not in line:
            continue
        rank = re.match(r"\[rank=(\d+)\]", line)
        rank = int(rank.group(1)) if rank else 0
        assert rank not in found, f"rank {rank} logged the line twice"
        found[rank] = line[line.index(needle) :]
    return found


# The shrunk const-cifar10.yaml at batch 4 (6 steps an epoch, 1 warmup epoch) and a learning
# rate no LARS step survives: step 1 (at peak/6) blows the weights up, and the forward pass of
# step 2, mid-epoch, overflows BatchNorm's running variances (its loss is still finite).
DIVERGING_LR = 1e12


@pytest.mark.multiprocess
@pytest.mark.parametrize("slots", [1, 2], ids=["1-slot", "2-slots"])
def test_a_diverging_trial_ends_once_ranked_last_without_a_restart(tmp_path, image_folder, slots):
    """A trial whose step goes non-finite mid-epoch: every slot logs the same line at the
    report after that step (scheduling_unit 1: the same step), the chief reports one last
    validation with the searcher metric's finite worst value, and every process exits 0: one
    outcome, COMPLETED (trial.go, handleAllocationExit), never RESTART, no early exit reported.
    A checkpoint follows every finite step; none follows the non-finite one, and the latest
    holds no infinite BatchNorm statistic. The line's numbers are checked against the reported
    training metrics and the LR warmup worked out by hand."""
    config = experiment_config(
        tmp_path, image_folder, learning_rate=DIVERGING_LR, global_batch_size=4
    )
    config["resources"]["slots_per_trial"] = slots
    config["min_checkpoint_period"] = {"batches": 1}  # a checkpoint after every finite step
    assert validation_errors(config) == []
    with Cluster(tmp_path) as cluster:
        trial = cluster.add_trial(cluster.create_experiment(config))
        result = run(cluster, trial, slots=slots)
    print("endpoints the harness called:\n  " + "\n  ".join(cluster.master.endpoints()))
    print("outcomes:", trial.outcomes)
    assert result.returncode == 0, result.stdout[-4000:]
    assert trial.outcomes == ["COMPLETED"] and trial.restarts == 0
    assert trial.early_exits == [] and "Traceback" not in result.stdout
    training = trial.reported("training")
    assert sorted(training) == [1, 2, 3]  # the report after the third step (index 2) is the last
    # The line, the same on every slot, names step 2 (2 steps done before it).
    lines = log_messages(result, "diverged:")
    assert sorted(lines) == list(range(slots)) and len(set(lines.values())) == 1, lines
    line = lines[0]
    peak = DIVERGING_LR * 4 / 256  # the linear scaling rule, global batch 4
    lr_step_2 = peak * 2 / 6  # linear warmup over the 6 steps of epoch 0
    assert line.startswith("diverged: step 2 went non-finite (its loss: "), line
    loss = float(re.search(r"its loss: ([0-9.e+-]+|nan|inf);", line).group(1))
    assert loss == pytest.approx(training[3]["loss"], rel=1e-5)  # the slots' mean
    assert f"(epoch 0), learning rate {lr_step_2:.6g} at that step " in line
    assert "(hyperparameters.learning_rate=1e+12)" in line
    last_finite = float(re.search(r"last finite loss: ([0-9.e+-]+)\.", line).group(1))
    assert last_finite == pytest.approx(training[2]["loss"], rel=1e-5)
    assert "Lower hyperparameters.learning_rate" in line and "--resume" in line
    assert f"trial {trial.id} diverged" in result.stdout
    # One validation, the worst (holdout_accuracy's lower end), every value finite.
    validation = trial.reported("validation")
    assert validation == {
        3: {"holdout_accuracy": 0.0, "batches": 3, "epochs": 0, "diverged_at_step": 2}
    }
    # No checkpoint after the divergence: step 2's is the trial's latest, and finite.
    assert [c.metadata["steps_completed"] for c in trial.checkpoints] == [1, 2]
    state = final_state(cluster, trial)
    bad = [k for k, t in state["models_state_dict"][0].items() if not torch.isfinite(t).all()]
    assert bad == [], bad
    written = {p.name for p in cluster.storage.iterdir() if (p / "metadata.json").is_file()}
    assert written == {c.uuid for c in trial.checkpoints}  # none written and left unreported
    if slots == 1:
        resume_with_a_lower_learning_rate(tmp_path, cluster, trial)


def resume_with_a_lower_learning_rate(tmp_path, cluster, trial):
    """The README's way on from a diverged trial: a checkpoint of it resumed locally with a lower
    learning rate continues at the checkpoint's step to the end (12 steps), on the schedule of
    the new rate. The latest (step 2) is finite but holds step 1's blown-up weights (its LR was
    2.6e9): a resume from it diverges again at once, with the local line. The one before it
    (step 1: step 0's LR is 0) trains on."""
    import model_def

    def resume(reported, name):
        os.chdir(ROOT)
        model_def.main(
            [
                "--resume",
                str(cluster.storage / reported.uuid),
                "--allow-config-change",
                "--set",
                "hyperparameters.learning_rate=0.1",
                "--checkpoint-dir",
                str(tmp_path / name),
            ]
        )
        base = tmp_path / name / "determined"
        by_step = {
            json.loads((base / uuid / "metadata.json").read_text())["steps_completed"]: base / uuid
            for uuid in os.listdir(base)
        }
        return by_step

    with pytest.raises(nonfinite.NonFiniteLossError, match=r"at step 2 \(epoch 0\)"):
        resume(trial.checkpoints[-1], "from-latest")
    by_step = resume(trial.checkpoints[0], "from-step-1")
    assert sorted(by_step) == list(range(2, 13))  # a checkpoint after every step from 2 on
    state = checkpoint.load_state(str(by_step[12] / "state_dict.pth"))
    (group, *_) = state["optimizers_state_dict"][0]["param_groups"]
    peak = 0.1 * 4 / 256  # the new rate, the linear scaling rule
    # Step 11 of 12 (6 warmup): the cosine at 5/6 of its half period.
    assert group["lr"] == pytest.approx(peak * (1 + math.cos(math.pi * 5 / 6)) / 2, rel=1e-9)
    assert all(torch.isfinite(t).all() for t in state["models_state_dict"][0].values())


def test_a_search_with_a_diverging_trial_ends_without_error_and_ranks_it_last(
    tmp_path, image_folder
):
    """search-cifar10.yaml shrunk to 4 trials of 2 epochs, adaptive ASHA (aggressive mode,
    divisor 2: one bracket of rungs at 1 and 2 epochs), run by the port of the 0.38.1 master's
    searcher (tests/searcher_standin.py). The second trial's learning rate diverges: it reports
    only the worst validation and exits 0. ASHA ranks it at its rung below every other trial
    and stops it; the search creates no replacement, every searcher metric it saw was a
    number, and the experiment ends COMPLETED, never STOPPING_ERROR."""
    config = experiment_config(tmp_path, image_folder, "search-cifar10.yaml", epochs=2)
    config["searcher"].update(
        max_time=2, max_trials=4, max_concurrent_trials=4, divisor=2, mode="aggressive"
    )
    assert validation_errors(config) == []
    values = iter(
        {"learning_rate": lr, "weight_decay": 1e-5, "tau_base": 0.99}
        for lr in (0.3, DIVERGING_LR, 1.0, 0.1)
    )
    seen = []  # every validation the searcher received, as the master decoded it

    def record_validations(cluster, call):
        if call.route == "post_ReportTrialMetrics" and call.body.group == "validation":
            seen.append(dict(call.body.metrics.metrics.avgMetrics))

    with Cluster(tmp_path) as cluster:
        cluster.on_call = record_validations
        experiment_id = cluster.create_experiment(config)
        search = cluster.start_search(experiment_id, lambda: next(values))
        assert len(cluster.trials) == 4  # ASHA's initial trials: max_concurrent_trials
        cluster.run_search(experiment_id)
        assert cluster.master.refused == [], cluster.master.refused
    trials = list(cluster.trials.values())
    for trial in trials:
        print(f"trial {trial.id}: lr {trial.hparams['learning_rate']:g}, outcomes {trial.outcomes}")
    assert search.state == "COMPLETED" and search.reasons == ["hp search completed"]
    assert len(trials) == 4 and all(t.outcomes == ["COMPLETED"] for t in trials)
    assert all(
        isinstance(m["holdout_accuracy"], float) and math.isfinite(m["holdout_accuracy"])
        for m in seen
    ), seen
    diverged = trials[1]
    assert diverged.reported("validation") == {
        3: {"holdout_accuracy": 0.0, "batches": 3, "epochs": 2, "diverged_at_step": 2}
    }
    # Its rung: the first (1 epoch), where all four were ranked; it is last there.
    rung = search.searcher.rung_of(cluster.request_ids[diverged.id])
    print("rung", rung.units_needed, "(negated holdout_accuracy):", rung.metrics)
    assert rung.units_needed == 1 and len(rung.metrics) == 4
    assert rung.metrics[-1] == [cluster.request_ids[diverged.id], -0.0]
    assert all(metric < 0.0 for _, metric in rung.metrics[:-1])  # each trained one scored > 0
    assert diverged.state == "STOPPING_COMPLETED"  # ASHA stopped it at that validation


def test_a_validation_that_cannot_be_computed_never_reaches_the_searcher(tmp_path, image_folder):
    """The model definition shipped to the cluster is patched so that the BYOL loss is NaN
    whenever no gradient is taken, i.e. in validation only: training stays finite and the
    validation loss of step 3 is NaN. Sent as it is, the master's ASHA would fail on it
    (getMetric, the string "NaN") and error the whole search. The trial instead reports the
    worst validation_loss (8.0, the loss's upper end), every slot logs the line, it writes no
    checkpoint of that state and exits 0: COMPLETED, never restarted."""
    model = shipped_model_definition(tmp_path / "model")
    byol_py = model / "byol.py"
    byol_py.write_text(
        byol_py.read_text()
        + "\n\n_training_loss = byol_loss\n\n\n"
        + "def byol_loss(prediction, target_projection):\n"
        + "    loss = _training_loss(prediction, target_projection)\n"
        + "    return loss if torch.is_grad_enabled() else loss * float('nan')\n"
    )
    config = experiment_config(tmp_path, image_folder, validate_with_classifier=False)
    config["searcher"].update(metric="validation_loss", smaller_is_better=True)
    assert validation_errors(config) == []
    with Cluster(tmp_path) as cluster:
        trial = cluster.add_trial(cluster.create_experiment(config, model))
        result = run(cluster, trial)
    assert result.returncode == 0, result.stdout[-4000:]
    assert trial.outcomes == ["COMPLETED"] and "Traceback" not in result.stdout
    assert sorted(trial.reported("training")) == [1, 2, 3]
    assert trial.reported("validation") == {
        3: {"validation_loss": 8.0, "batches": 3, "epochs": 1, "diverged_at_step": 3}
    }
    assert trial.checkpoints == []  # the validation's step is not checkpointed
    (line,) = log_messages(result, "diverged:").values()
    assert line.startswith("diverged: validation at step 3 gave validation_loss=nan (epoch 1)")
