"""End to end through the real command line and Determined's local Trainer: training validates,
checkpoints, resumes exactly, and stops cleanly on a non-finite loss."""

import datetime
import json
import os
import pickle
import re
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import byol
import checkpoint
import device
import evaluate_result
import export
import model_def
import nonfinite
import progress as progress_module
from benchmarks import speed
from config import load_config, parse_data_config, parse_hparams
from conftest import (
    ROOT,
    assert_same_training_state,
    checkpoints_by_step,
    fetch_commit_if_missing,
    folder_overrides,
    load_state,
    photo_like,
    run_python,
    tiny_config,
)


def train(config, checkpoint_dir, *extra):
    os.chdir(ROOT)  # as a user runs it: Determined copies the working dir into checkpoints
    model_def.main([str(config), "--checkpoint-dir", str(checkpoint_dir), *map(str, extra)])


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
        assert_same_training_state(reference[step][0], resumed[step][0])


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


EVERY_STEP = [
    "--set",
    "min_checkpoint_period={batches: 1}",
    "--set",
    "min_validation_period={batches: 100}",
]


@pytest.fixture(scope="module")
def every_step_run(tmp_path_factory):
    """6 steps of the tiny config with a checkpoint after each: {step: [dirs]}, and how to rerun.
    Base LR 3.2 and tau_base 0.9 make the hand-worked schedules below round numbers."""
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("every-step")
    folder = write_image_folder(root / "images")
    config = tiny_config(root, epochs=2, learning_rate=3.2, tau_base=0.9)
    train(config, root / "full", *folder_overrides(folder), *EVERY_STEP)
    full = checkpoints_by_step(root / "full")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    return full, config, folder


def test_resume_mid_epoch_is_exact(tmp_path, every_step_run):
    """N steps, checkpoint, resume, M more steps == N + M uninterrupted steps, bit for bit."""
    full, config, folder = every_step_run
    assert_resuming_step_4_reproduces(full, config, folder, EVERY_STEP, tmp_path / "resumed")


# The schedules of every_step_run, worked out by hand. 24 images at global batch 8: 3 steps an
# epoch, 2 epochs = K = 6 steps, warmup 1 epoch = 3 steps. Base LR 3.2 -> peak 3.2 x 8 / 256 =
# 0.1 (the linear scaling rule). Step k (k optimizer steps done before it) uses:
HAND_LR = [
    0.0,  # k=0: warmup 0.1 x 0/3
    0.1 / 3,  # k=1: 0.1 x 1/3
    0.2 / 3,  # k=2: 0.1 x 2/3
    0.1,  # k=3: cosine 0.1 x (1 + cos(0)) / 2
    0.075,  # k=4: 0.1 x (1 + cos(pi/3)) / 2 = 0.1 x 1.5 / 2
    0.025,  # k=5: 0.1 x (1 + cos(2 pi/3)) / 2 = 0.1 x 0.5 / 2
]
# tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 with tau_base 0.9, K = 6, at the steps
# between two checkpoints:
HAND_TAU = {
    1: 0.9066987298107780,  # 1 - 0.05 x (1 + cos(pi/6)) = 1 - 0.05 x 1.8660254037844386
    2: 0.925,  # 1 - 0.05 x (1 + 0.5)
    3: 0.95,  # 1 - 0.05 x (1 + 0)
    4: 0.975,  # 1 - 0.05 x (1 - 0.5)
    5: 0.9933012701892219,  # 1 - 0.05 x (1 - 0.8660254037844386)
}


def optimizer_parameter_names():
    """The model's parameter names in the optimizer state's index order (LARS's two groups)."""
    import optim
    from backbone import build_backbone

    network = byol.BYOLNetwork(build_backbone("resnet18", True, 32)[0], 512, 32, 16)
    names = {id(p): n for n, p in network.named_parameters()}
    groups = optim.parameter_groups(network, weight_decay=0.0)
    return [names[id(p)] for group in groups for p in group["params"]]


def test_each_step_uses_the_hand_worked_learning_rate_and_ema_tau(every_step_run):
    """From consecutive checkpoints of a real run: the LR each step used (stored in the
    optimizer, and as the weights actually moved: w' = w - lr * v') and the EMA of every target
    tensor (target' = tau_k target + (1 - tau_k) online') equal the hand-worked schedules."""
    saved = every_step_run[0]
    states = {s: load_state(saved[s][0]) for s in saved}
    names = optimizer_parameter_names()
    for step in range(1, 7):  # the checkpoint after step index k = step - 1
        for group in states[step]["optimizers_state_dict"][0]["param_groups"]:
            assert group["lr"] == pytest.approx(HAND_LR[step - 1], abs=1e-12), step
    for k in HAND_TAU:  # the step between checkpoints k and k + 1
        before, after = (states[s]["models_state_dict"][0] for s in (k, k + 1))
        momentum = states[k + 1]["optimizers_state_dict"][0]["state"]
        for index, name in enumerate(names):
            velocity = momentum[index]["momentum_buffer"].double()
            expected = before[name].double() - HAND_LR[k] * velocity
            assert torch.allclose(after[name].double(), expected, rtol=0, atol=1e-6), (k, name)
            if name.startswith(("online_backbone.", "online_projector.")):
                target = name.replace("online_", "target_", 1)
                ema = (
                    HAND_TAU[k] * before[target].double() + (1 - HAND_TAU[k]) * after[name].double()
                )
                error = float((after[target].double() - ema).abs().max())
                assert error <= 1e-6, (k, target, error)


@pytest.mark.parametrize(
    "every,checkpoints",
    [(1, [1, 2, 3, 4]), (3, [3])],
    ids=["report-and-checkpoint-every-step", "every-3-steps"],
)
def test_non_finite_loss_stops_at_that_step_without_a_poisoned_checkpoint(
    tmp_path, image_folder, monkeypatch, every, checkpoints
):
    """The loss of step 4 (the fifth) is NaN. The step's update is skipped on the device and
    the host raises at its next wait: at once when it reports every step; every 3 steps, step
    5 runs too and the progress line at the epoch's end (step 6) raises, before the report and
    checkpoint of step 6. Either way the error names step 4 and every checkpoint is finite."""
    real_loss = byol.byol_loss
    calls = {"n": 0}

    def loss_that_explodes_at_the_fifth_step(prediction, target):
        calls["n"] += 1
        loss = real_loss(prediction, target)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(byol, "byol_loss", loss_that_explodes_at_the_fifth_step)
    config = tiny_config(tmp_path)
    with pytest.raises(nonfinite.NonFiniteLossError) as error:
        train(
            config,
            tmp_path / "ckpt",
            *folder_overrides(image_folder),
            "--set",
            f"scheduling_unit={every}",
            "--set",
            f"min_checkpoint_period={{batches: {every}}}",
            "--set",
            "min_validation_period={batches: 100}",
        )
    message = str(error.value)
    assert "at step 4 (epoch 1)" in message and re.search(r"last finite loss: \d+\.\d+", message)
    written = checkpoints_by_step(tmp_path / "ckpt")
    assert sorted(written) == checkpoints
    for paths in written.values():
        state = load_state(paths[0])
        assert all(torch.isfinite(t).all() for t in state["models_state_dict"][0].values())
        for buffers in state["optimizers_state_dict"][0]["state"].values():
            assert torch.isfinite(buffers["momentum_buffer"]).all()


@pytest.mark.parametrize(
    "place,model",
    [
        ("device", "resnet18"),
        ("loader", "resnet18"),
        # A transformer and its AdamW (whose step count once took a host read per group).
        ("device", "vit_ti_16"),
    ],
)
def test_a_training_step_that_prints_nothing_never_waits_for_the_device(
    tmp_path, image_folder, monkeypatch, place, model
):
    """Counted around train_batch: no op whose result the host reads (.item(), nonzero,
    bool(tensor), ...), with the augmentation on the device or in the loader. (The code before
    issue 19 read the loss's finiteness every step, and its CPU augmentation used nonzero.)"""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "ckpt"))
    overrides = [o for o in folder_overrides(image_folder) if o != "--set"]
    overrides.append(f"hyperparameters.augment_on={place}")
    overrides.append(f"hyperparameters.backbone_name={model}")
    if model.startswith("vit"):
        overrides.append("hyperparameters.learning_rate=0.0005")
    with speed.local_trial(str(tiny_config(tmp_path)), overrides) as trial:
        batch = next(iter(trial.build_training_data_loader()))
        for step in (0, 1):  # 3 steps an epoch: steps_done 1 and 2 print no progress line
            counter = speed.count_step(trial, batch, step)
        assert counter.syncs() == 0, counter.sync_names()
        parts = ("augmentation", "network", "optimizer + EMA")
        assert all(counter.launches(part) > 0 for part in parts[place == "loader" :])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_training_steps_on_a_gpu_never_sync(tmp_path, image_folder, monkeypatch):
    """torch's own sync detector: any synchronising call inside the steps raises."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "ckpt"))
    overrides = [o for o in folder_overrides(image_folder) if o != "--set"]
    overrides += ["hyperparameters.augment_on=device", "hyperparameters.global_batch_size=4"]
    with speed.local_trial(str(tiny_config(tmp_path)), overrides) as trial:
        assert trial.device.type == "cuda"
        batches = iter(trial.build_training_data_loader())
        trial.context._current_batch_idx = 0
        trial.train_batch(next(batches), 0, 0)  # compiles, copies constants once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in (1, 2, 3, 4):  # 6 steps an epoch: no progress line
                trial.context._current_batch_idx = step
                trial.train_batch(next(batches), 0, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        trial.divergence.check_finite()


def test_a_failed_compile_says_so_once_and_runs_eager(monkeypatch, caplog):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: real_compile(fn, backend=failing_backend))
    torch._dynamo.reset()
    fn = device.CompiledOrEager(lambda x: torch.sin(x) * 2, "the test function")
    x = torch.linspace(0, 1, 5)
    with caplog.at_level("WARNING"):
        assert torch.equal(fn(x), torch.sin(x) * 2)
        assert torch.equal(fn(x), torch.sin(x) * 2)
    lines = [r.getMessage() for r in caplog.records if "compile" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("compile: the test function falls back to eager")


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
    """The reported validation_loss is the symmetrised BYOL loss, computed here with NumPy from
    the network of the step-3 checkpoint in eval mode on the fixed validation views of the
    test images (one batch of 8 of the 12)."""
    import augment
    import data
    from backbone import build_backbone

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
    assert step == 3 and "test_accuracy" not in metrics

    hp = parse_hparams(load_config(str(config))["hyperparameters"], 1)
    network = byol.BYOLNetwork(build_backbone("resnet18", True, 32)[0], 512, 32, 16)
    (saved,) = checkpoints_by_step(tmp_path / "ckpt")[3]
    network.load_state_dict(load_state(saved)["models_state_dict"][0])
    splits = data.build_splits(
        "image_folder",
        parse_data_config(
            {"train_dir": str(image_folder / "train"), "test_dir": str(image_folder / "test")}
        ),
    )
    test = splits.test
    augmentation = augment.TwoViewAugmentation(hp.augmentation, *splits.normalization)
    images = data.TrainImages(test, augmentation, 0, data.CorruptImageLog(False))
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
    cosine = lambda a, b: (unit(a) * unit(b)).sum(axis=1)
    batch_losses = []
    # The 12 test images in order, in batches of 8 (the per-slot batch) and the last 4, with the
    # views of epoch -1; Determined averages the batches' means.
    for batch in ([(i, -1) for i in range(8)], [(i, -1) for i in range(8, 12)]):
        collated = images.collate(images.__getitems__(batch))
        with torch.no_grad():
            p, z, _ = (
                t.double().numpy()
                for t in network.eval()(augmentation(collated["image"], collated["key"]))
            )
        n = len(batch)
        # The prediction from each view regresses the other view's target projection.
        batch_losses.append(
            np.mean((2 - 2 * cosine(p[:n], z[n:])) + (2 - 2 * cosine(p[n:], z[:n])))
        )
    expected = np.mean(batch_losses)
    assert metrics["validation_loss"] == pytest.approx(expected, rel=1e-6)


# The package as it landed before the code was split into augment.py, gcs.py, probe.py,
# checkpoint.py and device.py: its checkpoints are what users have on disk.
BEFORE_THE_SPLIT = "50093450d5d86db30f604ca6ef7e3ecfcc01cfe5"


def test_a_shallow_clone_fetches_the_commit_an_old_checkpoint_test_needs(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "--quiet", "--depth", "1", f"file://{ROOT}", str(clone)], check=True
    )
    missing = ["git", "-C", str(clone), "cat-file", "-e", BEFORE_THE_SPLIT]
    assert subprocess.run(missing, capture_output=True).returncode != 0
    fetch_commit_if_missing(clone, BEFORE_THE_SPLIT)
    assert (
        subprocess.run(
            ["git", "-C", str(clone), "cat-file", "-e", BEFORE_THE_SPLIT], capture_output=True
        ).returncode
        == 0
    )


# The code before the split needs torch >= 2.4 (add_safe_globals): on older torch it never wrote
# checkpoints, so the compat lane deselects this test (.ci/run: -m "not newer_torch").
@pytest.mark.newer_torch
@pytest.mark.skipif(
    not hasattr(torch.serialization, "add_safe_globals"),
    reason="the code before the split needs torch >= 2.4: it wrote no checkpoints here",
)
def test_checkpoints_written_before_the_split_resume_exactly_and_evaluate(tmp_path):
    """Checkpoints written by the code before the restructuring (checked out from git history
    and run as it was) resume with today's code to the same weights the old code reaches, and
    evaluate_result.py reads and exports them. The images are flat colours: the loader's crops
    changed filter since (issue 27: torch's resize of the box alone, not PIL's, which reads
    pixels beyond the box), and flat crops are the same pixels through either."""

    from conftest import write_image_folder

    image_folder = write_image_folder(tmp_path / "flat-images", flat=True)

    old = tmp_path / "old-code"
    old.mkdir()
    fetch_commit_if_missing(ROOT, BEFORE_THE_SPLIT)
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", BEFORE_THE_SPLIT], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    config = tiny_config(tmp_path, epochs=2, compile=False)  # the old code knows no `auto`
    every_step = ["--set", "min_checkpoint_period={batches: 1}"]
    written = run_python(
        "model_def.py",
        config,
        "--checkpoint-dir",
        tmp_path / "old",
        *folder_overrides(image_folder),
        *every_step,
        cwd=old,
    )
    assert written.returncode == 0, written.stderr[-3000:]
    by_old = checkpoints_by_step(tmp_path / "old")
    assert sorted(by_old) == [1, 2, 3, 4, 5, 6]

    assert_resuming_step_4_reproduces(by_old, config, image_folder, every_step, tmp_path / "new")

    ckpt = checkpoint.read(str(by_old[6][0]))
    exported = tmp_path / "backbone.pt"
    export.export_backbone(ckpt, checkpoint.hparams_of(ckpt), str(exported))
    weights = torch.load(exported, weights_only=True)
    assert torch.equal(
        weights["conv1.weight"],
        load_state(by_old[6][0])["models_state_dict"][0]["online_backbone.conv1.weight"],
    )


def test_a_run_shows_progress_and_summaries_and_writes_tensorboard_beside_checkpoints(
    tmp_path, image_folder, caplog, monkeypatch
):
    """Reporting every 100 steps (the shipped scheduling_unit) still prints a progress line at
    each epoch's end; each validation ends with one summary line; TensorBoard's files go under
    the checkpoint dir with the tags the README lists; a resumed run counts on from its step."""
    # Only the epoch-end lines are checked: no timed (every 30 s) line on a slow machine.
    defaults = progress_module.Progress.__init__.__defaults__
    monkeypatch.setattr(
        progress_module.Progress.__init__, "__defaults__", (float("inf"), *defaults[1:])
    )
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
    # One TensorBoard folder per run: the resumed run goes on in the one its checkpoint names,
    # under the new --checkpoint-dir; every checkpoint of it names the same run.
    run = checkpoint.tensorboard_run(saved[3][0])
    (resumed,) = checkpoints_by_step(tmp_path / "ckpt2")[6]
    assert checkpoint.tensorboard_run(resumed) == run
    assert os.listdir(tmp_path / "ckpt" / "tensorboard") == [run]
    assert os.listdir(tmp_path / "ckpt2" / "tensorboard") == [run]
    assert list((tmp_path / "ckpt2" / "tensorboard" / run).glob("events.out.tfevents.*"))


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


def test_a_flat_folder_of_unlabeled_photographs_trains_with_one_setting(tmp_path, caplog):
    """The real command on const-cifar10.yaml's image-folder form with only data.unlabeled_dir:
    24 JPEG photographs in one folder, no labels. 23 train (batch 8: 2 steps) and the held-out
    one (5%, at least 1) is scored by validation's BYOL loss, with no classifier metric; an
    evaluation of the checkpoint, which needs labels, says so in one line."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(24):
        Image.fromarray(photo_like(i, 30, 40)).save(flat / f"IMG_{i:04d}.jpg", quality=90)
    config = tiny_config(tmp_path, epochs=1)
    with caplog.at_level("INFO"):
        train(
            config,
            tmp_path / "ckpt",
            "--set",
            "hyperparameters.dataset_name=image_folder",
            "--set",
            f"data.unlabeled_dir={flat}",
        )
    ((step, metrics),) = validation_metrics(caplog)
    assert step == 2 and np.isfinite(metrics["validation_loss"])
    assert sorted(metrics) == ["batches", "epochs", "validation_loss"]
    assert "validated: 1 records" in caplog.text
    (saved,) = checkpoints_by_step(tmp_path / "ckpt")[2]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_result.main(["--checkpoint", str(saved), "--device", "cpu", "--no-augment"])
    assert str(exit_info.value.code) == (
        f"error: the evaluation needs labeled images and data.unlabeled_dir '{flat}' has none: "
        "give <class>/<image> folders with --set data.train_dir=... --set data.test_dir=..."
    )
