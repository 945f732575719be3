"""Fine-tuning (finetune.py) through the real command on real image files: the labeled subset a
run trains on, where its backbone's weights come from, that it chooses on held-out images and
never on test images, and that it resumes exactly."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

import curves
import data
import finetune
from benchmarks.label_fractions import choose_by_holdout, fine_tune
from config import ConfigError
from conftest import (
    CLASSES,
    ROOT,
    assert_same_training_state,
    checkpoints_by_step,
    load_state,
    run_python,
    tiny_finetune_config,
    train_tiny_run,
    write_cifar10,
    write_planted_folder,
)


def finetune_config(tmp_path, folder, **hparams):
    """conftest.tiny_finetune_config written to tmp_path/finetune.yaml."""
    path = tmp_path / "finetune.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(tiny_finetune_config(tmp_path, folder, **hparams), f)
    return path


def run_finetune(config, checkpoint_dir, *extra):
    os.chdir(ROOT)  # as a user runs it: Determined copies the working dir into checkpoints
    finetune.main([str(config), "--checkpoint-dir", str(checkpoint_dir), *map(str, extra)])


def refusal(config, checkpoint_dir):
    """The one line the command exits with."""
    with pytest.raises(SystemExit) as refused:
        run_finetune(config, checkpoint_dir)
    return str(refused.value)


def last_checkpoint(checkpoint_dir):
    saved = checkpoints_by_step(checkpoint_dir)
    return saved[max(saved)][0]


def subset_rows(checkpoint_dir):
    with open(last_checkpoint(checkpoint_dir) / finetune.SUBSET_FILE) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """train/<class>/ 20 images and test/<class>/ 4 images per class whose every pixel shows the
    class (conftest.write_planted_folder: channel c bright for class c)."""
    root = tmp_path_factory.mktemp("planted")
    write_planted_folder(root / "train", 20)
    write_planted_folder(root / "test", 4)
    return root


# ---- the labeled subset -------------------------------------------------------------------


def test_a_label_fraction_is_class_balanced_deterministic_nested_and_refused_when_too_small():
    labels = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [10, 25, 40]))
    classes = ["a", "b", "c"]
    tenth = data.label_fraction_subset(labels, classes, 0.1, seed=3)
    # round(0.1 x 10, 25, 40) with halves rounded up: 1, 3 (2.5), 4.
    assert np.bincount(labels[tenth]).tolist() == [1, 3, 4]
    fifth = data.label_fraction_subset(labels, classes, 0.2, seed=3)
    assert np.bincount(labels[fifth]).tolist() == [2, 5, 8]
    assert set(tenth) <= set(fifth)  # the 10% subset lies inside the 20% one
    assert np.array_equal(tenth, data.label_fraction_subset(labels, classes, 0.1, seed=3))
    assert not np.array_equal(tenth, data.label_fraction_subset(labels, classes, 0.1, seed=4))
    assert np.array_equal(data.label_fraction_subset(labels, classes, 1.0, 3), np.arange(75))
    with pytest.raises(ConfigError) as refused:
        data.label_fraction_subset(labels, classes, 0.04, seed=3)
    # 0.04 x 10 = 0.4 images of class 'a'; one image of it needs 0.5 / 10.
    assert str(refused.value) == (
        "hyperparameters.label_fraction=0.04 gives 0 labeled images of class 'a' (0.04 x its 10 "
        "images outside the held-out part); every class needs at least 1: the smallest fraction "
        "these images allow is 0.05"
    )


def test_the_run_lists_the_balanced_subset_it_trained_on_and_never_a_held_out_image(
    tmp_path, planted
):
    # 20 training images a class: 5 held out (0.25), 15 left; half of those is 7.5 -> 8.
    run_finetune(finetune_config(tmp_path, planted, label_fraction=0.5), tmp_path / "half")
    half = subset_rows(tmp_path / "half")
    assert sorted(r["class"] for r in half) == sorted(CLASSES * 8)
    for row in half:  # real training files, each named with its own class folder
        assert row["image"].split("/")[0] == row["class"]
        assert (planted / "train" / row["image"]).is_file()
    assert len({r["image"] for r in half}) == len(half)
    # Validation scored the held-out part and the test folder: 5 + 4 images a class.
    (run,) = os.listdir(tmp_path / "half" / "tensorboard")
    series = curves.tensorboard_series(str(tmp_path / "half" / "tensorboard" / run))
    assert series["holdout_images"] == [(3, 15.0)] and series["test_images"] == [(3, 12.0)]
    run_finetune(finetune_config(tmp_path, planted, label_fraction=1.0), tmp_path / "all")
    everything = {r["image"] for r in subset_rows(tmp_path / "all")}
    # All of the 15 a class outside the held-out part, none of the 5 held out; the half
    # subset is inside it (same seed), and another seed holds out other images.
    assert len(everything) == 45 and {r["image"] for r in half} <= everything
    config = finetune_config(tmp_path, planted, label_fraction=1.0)
    run_finetune(config, tmp_path / "seed1", "--set", "reproducibility.experiment_seed=1")
    assert {r["image"] for r in subset_rows(tmp_path / "seed1")} != everything
    # Rerun with the first seed: the same list, line for line.
    run_finetune(finetune_config(tmp_path, planted, label_fraction=0.5), tmp_path / "again")
    assert subset_rows(tmp_path / "again") == half


def test_a_fraction_too_small_is_refused_in_one_line_before_any_work(tmp_path, planted):
    config = finetune_config(tmp_path, planted, label_fraction=0.01)
    assert refusal(config, tmp_path / "ckpt") == (
        "error: hyperparameters.label_fraction=0.01 gives 0 labeled images of class 'airplane' "
        "(0.01 x its 15 images outside the held-out part); every class needs at least 1: the "
        "smallest fraction these images allow is 0.03333"
    )
    assert checkpoints_by_step(tmp_path / "ckpt") == {}


# ---- choosing on held-out images ------------------------------------------------------------


def test_the_learning_rate_is_chosen_on_held_out_images_and_test_accuracy_only_reported(
    tmp_path, planted
):
    """A known answer: the test folder's labels are rotated (its 'airplane' images show the cat
    colour, ...), so a classifier that learned the classes scores 0 on test and 1 on held-out
    training images, and one that learned nothing scores about a third on both. Choosing on
    held-out images picks the learning rate that learned, and reports its test accuracy: 0.
    Training or choosing on the test images would pick, or make, the other."""
    rotated = tmp_path / "rotated"
    shutil.copytree(planted / "train", rotated / "train")
    for i, cls in enumerate(CLASSES):
        shutil.copytree(planted / "test" / CLASSES[(i + 1) % 3], rotated / "test" / cls)
    # The shrunk config's hyperparameters, 3 epochs, the backbone frozen: a linear probe learns
    # the colours in 15 steps.
    settings = dict(
        tiny_finetune_config(tmp_path, rotated)["hyperparameters"], epochs=3, backbone_lr_scale=0.0
    )
    folders = {"train_dir": str(rotated / "train"), "test_dir": str(rotated / "test")}
    runs = {}
    os.chdir(ROOT)
    for lr in (1e-6, 3.2):  # peak 3.2 x 8 / 256 = 0.1; 1e-6 moves nothing
        metrics = fine_tune(
            str(tmp_path / f"lr-{lr:g}"),
            {},
            dict(folders, num_workers=0),
            dict(settings, learning_rate=lr),
        )
        runs[lr] = metrics
    print(runs)
    assert runs[3.2]["holdout_accuracy"] == 1.0 and runs[3.2]["test_accuracy"] == 0.0
    assert runs[1e-6]["holdout_accuracy"] < 0.5
    from benchmarks.label_fractions import Run

    chosen = choose_by_holdout(
        [
            Run(1.0, "m", lr, 45, m["holdout_accuracy"], m["test_accuracy"], 0)
            for lr, m in runs.items()
        ]
    )
    assert chosen.lr == 3.2 and chosen.test_accuracy == 0.0


# ---- where the backbone comes from ----------------------------------------------------------


@pytest.fixture(scope="module")
def byol_checkpoint(tmp_path_factory):
    """A real BYOL checkpoint (conftest.train_tiny_run: ResNet-18, CIFAR stem, 16 px) with a
    planted weight: conv1.weight[0, 0, 0, 0] = 7 in its online backbone."""
    run = train_tiny_run(tmp_path_factory.mktemp("byol"))
    state = load_state(run.checkpoint)
    state["models_state_dict"][0]["online_backbone.conv1.weight"][0, 0, 0, 0] = 7.0
    torch.save(state, run.checkpoint / "state_dict.pth")
    return run


def backbone_of(checkpoint_dir):
    model = load_state(last_checkpoint(checkpoint_dir))["models_state_dict"][0]
    return {k[len("backbone.") :]: v for k, v in model.items() if k.startswith("backbone.")}


def planted_backbone(byol_run):
    model = load_state(byol_run.checkpoint)["models_state_dict"][0]
    prefix = "online_backbone."
    return {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}


def marker_of(checkpoint_dir):
    return json.loads((last_checkpoint(checkpoint_dir) / "byol_checkpoint.json").read_text())


def from_byol_checkpoint(tmp_path, planted, byol_checkpoint, **hparams):
    """The shrunk config fine-tuning the BYOL checkpoint (unless `hparams` name another
    source), following its architecture."""
    source = dict(
        pretrained={"checkpoint": str(byol_checkpoint.checkpoint)},
        backbone_name=None,
        cifar_stem=None,
        image_size=None,
    )
    return finetune_config(tmp_path, planted, **dict(source, **hparams))


def test_a_frozen_backbone_from_a_byol_checkpoint_keeps_its_weights(
    tmp_path, planted, byol_checkpoint
):
    """Frozen (backbone_lr_scale 0, a linear probe), the backbone after training is the
    checkpoint's online backbone, every weight and BatchNorm statistic, the planted one too."""
    config = from_byol_checkpoint(tmp_path, planted, byol_checkpoint, backbone_lr_scale=0.0)
    run_finetune(config, tmp_path / "ckpt")
    trained, source = backbone_of(tmp_path / "ckpt"), planted_backbone(byol_checkpoint)
    assert trained.keys() == source.keys()
    for name in source:
        assert torch.equal(trained[name], source[name]), name
    assert float(trained["conv1.weight"][0, 0, 0, 0]) == 7.0
    marker = marker_of(tmp_path / "ckpt")
    assert marker["trial"] == finetune.TRIAL_SPEC
    assert marker["pretrained"] == {
        "kind": "checkpoint",
        "checkpoint": str(byol_checkpoint.checkpoint),
        "checkpoint_uuid": byol_checkpoint.uuid,
        "steps_completed": 3,
    }
    # As the BYOL run was trained: CIFAR stem, 16 px.
    assert (marker["backbone_name"], marker["cifar_stem"], marker["image_size"]) == (
        "resnet18",
        True,
        16,
    )


def test_an_exported_backbone_loads_with_its_weights(tmp_path, planted, byol_checkpoint):
    exported = tmp_path / "backbone.pt"
    result = run_python(
        "evaluate_result.py",
        "--checkpoint",
        byol_checkpoint.checkpoint,
        "--export",
        exported,
        "--export-only",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = from_byol_checkpoint(
        tmp_path,
        planted,
        byol_checkpoint,
        pretrained={"export": str(exported)},
        backbone_lr_scale=0.0,
    )
    run_finetune(config, tmp_path / "ckpt")
    trained, source = backbone_of(tmp_path / "ckpt"), planted_backbone(byol_checkpoint)
    for name in source:
        assert torch.equal(trained[name], source[name]), name
    assert marker_of(tmp_path / "ckpt")["pretrained"]["kind"] == "export"


def test_fine_tuning_trains_the_pretrained_backbone_and_random_init_has_no_planted_weight(
    tmp_path, planted, byol_checkpoint
):
    config = from_byol_checkpoint(tmp_path, planted, byol_checkpoint, learning_rate=3.2)
    run_finetune(config, tmp_path / "tuned")
    tuned = backbone_of(tmp_path / "tuned")["conv1.weight"][0, 0, 0, 0]
    # Trained from the planted 7.0: moved by the steps, not restarted from scratch.
    assert tuned != 7.0 and abs(float(tuned) - 7.0) < 1.0
    run_finetune(finetune_config(tmp_path, planted), tmp_path / "random")
    assert abs(float(backbone_of(tmp_path / "random")["conv1.weight"][0, 0, 0, 0])) < 1.0
    assert marker_of(tmp_path / "random")["pretrained"] == {"kind": "random"}


def test_a_backbone_that_cannot_take_the_weights_is_refused_in_one_line(
    tmp_path, planted, byol_checkpoint
):
    config = finetune_config(
        tmp_path,
        planted,
        pretrained={"checkpoint": str(byol_checkpoint.checkpoint)},
        backbone_name="resnet34",
        cifar_stem=None,
        image_size=None,
    )
    assert refusal(config, tmp_path / "ckpt") == (
        "error: hyperparameters.backbone_name='resnet34' does not fit the pretrained backbone, "
        "which is backbone_name=resnet18: its weights cannot load; leave backbone_name unset "
        "(null) to follow it"
    )


def test_a_cluster_source_is_refused_locally_with_what_to_do(tmp_path, planted):
    config = finetune_config(tmp_path, planted, pretrained={"experiment_id": 17})
    assert "download it (det checkpoint download UUID)" in refusal(config, tmp_path / "ckpt")


# ---- resuming ---------------------------------------------------------------------------------


def test_resume_mid_epoch_is_exact(tmp_path, planted):
    """18 labeled images (6 a class: 0.4 of the 15 left after holding out 5), batch 8: 2 steps an
    epoch, 3 epochs. A checkpoint after every step; resuming from step 3 (mid epoch 2) gives
    steps 4 to 6 bit for bit: weights, BatchNorm statistics, momentum, learning rate."""
    config = finetune_config(tmp_path, planted, label_fraction=0.4, epochs=3, learning_rate=3.2)
    every_step = ["--set", "min_checkpoint_period={batches: 1}"]
    run_finetune(config, tmp_path / "full", *every_step)
    full = checkpoints_by_step(tmp_path / "full")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    run_finetune(config, tmp_path / "resumed", *every_step, "--resume", full[3][0])
    resumed = checkpoints_by_step(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert_same_training_state(full[step][0], resumed[step][0])
    # The LR at step 4 (3 done) of 6, no warmup: 0.1 x (1 + cos(pi x 3/6)) / 2 = 0.05, the
    # backbone's the same (backbone_lr_scale 1).
    assert [
        g["lr"] for g in load_state(full[4][0])["optimizers_state_dict"][0]["param_groups"]
    ] == [pytest.approx(0.05)] * 2


def test_cifar10_fine_tunes_and_lists_its_subset_by_row_of_the_training_split(tmp_path, no_md5):
    """The shipped config's own dataset (CIFAR-10's python batches, written as the archive
    lays them out): the subset lists rows of the training split, each with the class the
    batches give that row."""
    written = write_cifar10(tmp_path / "downloads", train_count=40, test_count=20)
    config = finetune_config(
        tmp_path,
        tmp_path,
        dataset_name="cifar10",
        cifar_stem=True,
        image_size=32,
        holdout_fraction=0.1,
    )
    run_finetune(config, tmp_path / "ckpt")
    rows = subset_rows(tmp_path / "ckpt")
    labels = written["train"][1]
    names = marker_of(tmp_path / "ckpt")["classes"]
    assert names[:2] == ["airplane", "automobile"] and len(names) == 10
    assert rows and all(r["image"].startswith("row ") for r in rows)
    for row in rows:
        assert row["class"] == names[labels[int(row["image"].split()[1])]]
