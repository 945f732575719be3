"""End to end through the real command line and Determined's local Trainer: training validates,
checkpoints, resumes exactly, and stops cleanly on a non-finite loss."""

import datetime
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

import byol
import checkpoint
import model_def
from conftest import ROOT, folder_overrides, tiny_config


def train(config, checkpoint_dir, *extra):
    os.chdir(ROOT)  # as a user runs it: Determined copies the working dir into checkpoints
    model_def.main([str(config), "--checkpoint-dir", str(checkpoint_dir), *map(str, extra)])


def checkpoints_by_step(checkpoint_dir):
    out = {}
    base = checkpoint_dir / "determined"
    for uuid in os.listdir(base) if base.exists() else []:
        meta = base / uuid / "metadata.json"
        if meta.exists():
            out.setdefault(json.loads(meta.read_text())["steps_completed"], []).append(base / uuid)
    return out


def load_state(path):
    return checkpoint.load_state(str(path / "state_dict.pth"))


def test_checkpoint_state_loads_determineds_rng_state_and_refuses_other_objects(tmp_path):
    """state_dict.pth holds NumPy's RNG state (Determined saves np.random.get_state()); it loads.
    Where torch has an allowlist (>= 2.4), loading is weights_only: any other object is refused.
    torch 2.3 has none and loads everything, as Determined does there."""
    rng = np.random.RandomState(7).get_state()
    torch.save({"rng_state": rng, "weights": torch.arange(3.0)}, tmp_path / "state_dict.pth")
    state = checkpoint.load_state(str(tmp_path / "state_dict.pth"))
    assert state["rng_state"][0] == "MT19937" and state["rng_state"][2:] == rng[2:]
    assert (
        np.array_equal(state["rng_state"][1], rng[1]) and state["rng_state"][1].dtype == np.uint32
    )
    assert torch.equal(state["weights"], torch.tensor([0.0, 1.0, 2.0]))

    torch.save({"saved_on": datetime.date(2024, 3, 1)}, tmp_path / "other.pth")
    if hasattr(torch.serialization, "add_safe_globals"):
        with pytest.raises(pickle.UnpicklingError, match="datetime"):
            checkpoint.load_state(str(tmp_path / "other.pth"))
    else:
        assert checkpoint.load_state(str(tmp_path / "other.pth")) == {
            "saved_on": datetime.date(2024, 3, 1)
        }


def validation_metrics(caplog):
    found = []
    for record in caplog.records:
        m = re.search(
            r"report_validation_metrics\(steps_completed=(\d+), metrics=(\{.*\})\)",
            record.getMessage(),
        )
        if m:
            found.append((int(m.group(1)), eval(m.group(2), {"np": np})))
    return found


def assert_resuming_step_4_reproduces(reference, config, folder, extra, checkpoint_dir):
    """Resume today's code from the step-4 checkpoint of `reference` ({step: [dirs]}; step 4 is
    mid-epoch 2 at 3 steps an epoch): steps 5 and 6 equal the reference's bit for bit, weights,
    momentum and learning rate."""
    train(config, checkpoint_dir, *folder_overrides(folder), *extra, "--resume", reference[4][0])
    resumed = checkpoints_by_step(checkpoint_dir)
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        a, b = load_state(reference[step][0]), load_state(resumed[step][0])
        for name, tensor in a["models_state_dict"][0].items():
            assert torch.equal(tensor, b["models_state_dict"][0][name]), (step, name)
        for x, y in zip(
            a["optimizers_state_dict"][0]["state"].values(),
            b["optimizers_state_dict"][0]["state"].values(),
        ):
            assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
        assert (
            a["optimizers_state_dict"][0]["param_groups"][0]["lr"]
            == b["optimizers_state_dict"][0]["param_groups"][0]["lr"]
        )


def test_training_validates_checkpoints_and_resumes(tmp_path, image_folder, caplog):
    # 24 images, batch 8: 3 steps per epoch, 2 epochs; validate and checkpoint every epoch.
    config = tiny_config(tmp_path)
    with caplog.at_level("INFO"):
        train(config, tmp_path / "ckpt", *folder_overrides(image_folder))
    metrics = validation_metrics(caplog)
    assert [step for step, _ in metrics] == [3, 6]
    for _, m in metrics:
        assert 0.0 <= m["test_accuracy"] <= 1.0 and 0.0 <= m["knn_accuracy"] <= 1.0
        assert m["classifier_best_lr"] in (0.01, 0.03, 0.1, 0.3, 1.0)
        assert "classifier_lr_0.1_test_accuracy" in m
    saved = checkpoints_by_step(tmp_path / "ckpt")
    assert sorted(saved) == [3, 6]
    last = saved[6][0]
    assert json.loads((last / checkpoint.MARKER).read_text())["backbone_name"] == "resnet18"
    assert (last / "code" / "model_def.py").exists() and not (last / "code" / ".venv").exists()
    # Resume from the epoch-1 checkpoint with one more epoch of budget: continues at step 3.
    caplog.clear()
    with caplog.at_level("INFO"):
        train(config, tmp_path / "ckpt2", *folder_overrides(image_folder), "--resume", saved[3][0])
    assert [step for step, _ in validation_metrics(caplog)] == [6]


def test_resume_mid_epoch_is_exact(tmp_path, image_folder):
    """N steps, checkpoint, resume, M more steps == N + M uninterrupted steps, bit for bit."""
    config = tiny_config(tmp_path, epochs=2)
    every_step = [
        "--set",
        "min_checkpoint_period={batches: 1}",
        "--set",
        "min_validation_period={batches: 100}",
    ]
    train(config, tmp_path / "full", *folder_overrides(image_folder), *every_step)
    full = checkpoints_by_step(tmp_path / "full")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert_resuming_step_4_reproduces(full, config, image_folder, every_step, tmp_path / "resumed")
    # The target moved by EMA and differs from the online network.
    weights = load_state(full[6][0])["models_state_dict"][0]
    assert not torch.equal(
        weights["online_backbone.conv1.weight"], weights["target_backbone.conv1.weight"]
    )


def test_non_finite_loss_stops_at_that_step_without_a_poisoned_checkpoint(
    tmp_path, image_folder, monkeypatch
):
    real_loss = byol.byol_loss
    calls = {"n": 0}

    def loss_that_explodes_at_the_fifth_step(prediction, target):
        calls["n"] += 1
        loss = real_loss(prediction, target)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(byol, "byol_loss", loss_that_explodes_at_the_fifth_step)
    config = tiny_config(tmp_path)
    with pytest.raises(model_def.NonFiniteLossError) as error:
        train(
            config,
            tmp_path / "ckpt",
            *folder_overrides(image_folder),
            "--set",
            "min_checkpoint_period={batches: 1}",
            "--set",
            "min_validation_period={batches: 100}",
        )
    message = str(error.value)
    assert "at step 4 (epoch 1)" in message and re.search(r"last finite loss: \d+\.\d+", message)
    assert sorted(checkpoints_by_step(tmp_path / "ckpt")) == [1, 2, 3, 4]


def training_losses(caplog):
    out = {}
    for record in caplog.records:
        m = re.search(
            r"report_training_metrics\(steps_completed=(\d+), metrics=(\{.*\})\)",
            record.getMessage(),
        )
        if m:
            out[int(m.group(1))] = eval(m.group(2), {"np": np})["loss"]
    return out


def test_augmenting_on_the_device_or_in_the_loader_trains_identically(
    tmp_path, image_folder, caplog
):
    config = tiny_config(tmp_path, epochs=1)
    losses = {}
    for place in ("device", "loader"):
        caplog.clear()
        with caplog.at_level("INFO"):
            train(
                config,
                tmp_path / place,
                *folder_overrides(image_folder),
                "--set",
                f"hyperparameters.augment_on={place}",
                "--set",
                "data.num_workers=1",
            )
        losses[place] = training_losses(caplog)
    assert sorted(losses["device"]) == [1, 2, 3]
    for step, loss in losses["device"].items():
        assert loss == pytest.approx(losses["loader"][step], rel=1e-5)


def test_without_labels_validation_reports_the_byol_loss(tmp_path, image_folder, caplog):
    config = tiny_config(tmp_path, epochs=1, validate_with_classifier=False)
    with caplog.at_level("INFO"):
        train(
            config,
            tmp_path / "ckpt",
            *folder_overrides(image_folder),
            "--set",
            "searcher.metric=validation_loss",
            "--set",
            "searcher.smaller_is_better=true",
        )
    ((step, metrics),) = validation_metrics(caplog)
    assert step == 3 and 0 < metrics["validation_loss"] < 8 and "test_accuracy" not in metrics


# The package as it landed before the code was split into augment.py, gcs.py, probe.py,
# checkpoint.py and device.py: its checkpoints are what users have on disk.
BEFORE_THE_SPLIT = "50093450d5d86db30f604ca6ef7e3ecfcc01cfe5"


def test_checkpoints_written_before_the_split_resume_exactly_and_evaluate(tmp_path, image_folder):
    """Checkpoints written by the code before the restructuring (checked out from git history
    and run as it was) resume with today's code to the same weights the old code reaches, and
    evaluate_result.py reads and exports them."""
    import subprocess
    import sys

    import evaluate_result

    if not hasattr(torch.serialization, "add_safe_globals"):
        pytest.skip("the code before the split needs torch >= 2.4: it wrote no checkpoints here")
    old = tmp_path / "old-code"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", BEFORE_THE_SPLIT], capture_output=True, timeout=60
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE_THE_SPLIT} is not in this clone's history")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    config = tiny_config(tmp_path, epochs=2)
    every_step = ["--set", "min_checkpoint_period={batches: 1}"]
    written = subprocess.run(
        [
            sys.executable,
            "model_def.py",
            str(config),
            "--checkpoint-dir",
            str(tmp_path / "old"),
            *map(str, folder_overrides(image_folder)),
            *every_step,
        ],
        cwd=old,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert written.returncode == 0, written.stderr[-3000:]
    by_old = checkpoints_by_step(tmp_path / "old")
    assert sorted(by_old) == [1, 2, 3, 4, 5, 6]

    assert_resuming_step_4_reproduces(by_old, config, image_folder, every_step, tmp_path / "new")

    ckpt = evaluate_result.open_checkpoint(str(by_old[6][0]))
    exported = tmp_path / "backbone.pt"
    evaluate_result.export_backbone(ckpt, evaluate_result.hparams_of(ckpt), str(exported))
    weights = torch.load(exported, weights_only=True)
    assert torch.equal(
        weights["conv1.weight"],
        load_state(by_old[6][0])["models_state_dict"][0]["online_backbone.conv1.weight"],
    )


def test_a_run_shows_progress_and_summaries_and_writes_tensorboard_beside_checkpoints(
    tmp_path, image_folder, caplog
):
    """Reporting every 100 steps (the shipped scheduling_unit) still prints a progress line at
    each epoch's end; each validation ends with one summary line; TensorBoard's files go under
    the checkpoint dir with the tags the README lists; a resumed run counts on from its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tmp_path)
    rarely = ["--set", "scheduling_unit=100"]
    with caplog.at_level("INFO"):
        train(config, tmp_path / "ckpt", *folder_overrides(image_folder), *rarely)
    lines = [r.getMessage() for r in caplog.records if r.name == "byol"]
    progress = [line.split("  loss")[0] for line in lines if line.startswith("step ")]
    assert progress == ["step 3/6  epoch 1/2", "step 6/6  epoch 2/2"]
    summaries = [line for line in lines if line.startswith("validation at step")]
    assert [s.split(":")[0] for s in summaries] == ["validation at step 3", "validation at step 6"]
    assert all("holdout_accuracy" in s and "test_accuracy" in s for s in summaries)

    event_files = list((tmp_path / "ckpt" / "tensorboard").glob("**/events.out.tfevents.*"))
    assert event_files
    tags = set()
    for events in event_files:
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    readme = open(os.path.join(ROOT, "README.md")).read()
    listed = set(re.findall(r"`(Determined/[\w.]+)`", readme))
    assert listed and listed <= tags, (listed - tags, tags)

    caplog.clear()
    saved = checkpoints_by_step(tmp_path / "ckpt")
    with caplog.at_level("INFO"):
        train(
            config,
            tmp_path / "ckpt2",
            *folder_overrides(image_folder),
            *rarely,
            "--resume",
            saved[3][0],
        )
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [p.split("  loss")[0] for p in progress] == ["step 6/6  epoch 2/2"]


def test_resume_takes_the_checkpoints_own_config_and_refuses_a_changed_result(
    tmp_path, image_folder, caplog
):
    config = tiny_config(tmp_path)
    train(config, tmp_path / "ckpt", *folder_overrides(image_folder))
    epoch_one = checkpoints_by_step(tmp_path / "ckpt")[3][0]

    # The checkpoint alone: its own config, data paths and all, from another directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    with caplog.at_level("INFO"):
        model_def.main(["--resume", str(epoch_one), "--checkpoint-dir", str(tmp_path / "alone")])
    os.chdir(ROOT)
    assert sorted(checkpoints_by_step(tmp_path / "alone")) == [6]

    # A --set that changes what the run computes is refused, naming each difference.
    with pytest.raises(SystemExit) as refused:
        model_def.main(
            [
                "--resume",
                str(epoch_one),
                "--checkpoint-dir",
                str(tmp_path / "no"),
                "--set",
                "hyperparameters.epochs=3",
                "--set",
                "hyperparameters.augmentation.flip_prob=0.0",
                "--set",
                "data.num_workers=1",
            ]
        )
    assert str(refused.value.code) == (
        f"error: --resume {epoch_one}: the config differs from the checkpoint's in what it "
        f"computes: hyperparameters.augmentation.flip_prob: 0.5 -> 0.0; "
        f"hyperparameters.epochs: 2 -> 3. Resume without those changes, or pass "
        f"--allow-config-change"
    )
    assert not (tmp_path / "no").exists()

    caplog.clear()
    with caplog.at_level("INFO"):
        model_def.main(
            [
                "--resume",
                str(epoch_one),
                "--checkpoint-dir",
                str(tmp_path / "longer"),
                "--set",
                "hyperparameters.epochs=3",
                "--allow-config-change",
            ]
        )
    assert "the LR and EMA schedules now span 9 steps (3 epochs)" in caplog.text
    assert sorted(checkpoints_by_step(tmp_path / "longer")) == [6, 9]
