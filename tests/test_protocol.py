"""What the evaluation protocol forbids, one test per rule a user relies on; each fails when its
rule is broken:

  - a classifier's learning rate is chosen on held-out training images, never on test images;
  - no classifier, standardisation or kNN bank learns from a test image;
  - a checkpoint is chosen only by a held-out metric (the searcher, `checkpoint_policy: best`,
    `evaluate_result.py --experiment-id`);
  - labels never reach pretraining.

The first two run the real validation (model_def's command) and the real evaluation
(evaluate_result.py, cached features and augmented) on a planted image folder, with a stand-in
backbone whose features are each image's own pixels: every row that a probe, a standardisation
or the kNN receives is traced back to its file, and the right answers are known in advance.
"""

import contextlib
import dataclasses
import json
import os
from collections import Counter
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
import yaml
from determined.common.api import bindings
from PIL import Image

import byol
import checkpoint
import data
import evaluate_result
import linear_eval
import model_def
import probe
import reducers
from config import ConfigError, parse_experiment_config
from conftest import CLASSES, ROOT, folder_overrides, tiny_config, write_stl10
from probe import SPLIT_FIT, SPLIT_HOLDOUT, SPLIT_TEST

SIZE = 16  # tiny_config's image size
TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 12
HOLDOUT_FRACTION = 0.25
HELD_PER_CLASS = 2  # 0.25 of each class's 8 training images
# One learning rate too small to move a head (its accuracy is that of its random start), one
# that learns the planted classes.
STILL, LEARNS = 1e-7, 0.1
CLASSIFIER_EPOCHS = 3
PLACES = ("validation", "evaluation-cached-features", "evaluation-augmented")


# ---- the planted images and the backbone that shows them ----------------------------------


@dataclasses.dataclass(frozen=True)
class File:
    name: str  # e.g. "train/cat/003.png"
    label: int  # its folder's class index, as the package reads it


def write_planted_folders(root) -> Dict[bytes, File]:
    """train/<class>/ with 8 images and test/<class>/ with 12, 16 px, each image's whole area
    showing one class: its channel bright (200-255), the others dark (0-60). Training images
    are in their own class's folder; test images are in the next class's folder, so a
    classifier that learned the training images is wrong on every test image, and one that also
    learned the test images (which outnumber the fit images of each class) is wrong on every
    held-out image. Returns each image's file by its pixels (H, W, 3 uint8 bytes)."""
    rng = np.random.default_rng(11)
    files = {}
    for split, count, shift in (("train", TRAIN_PER_CLASS, 0), ("test", TEST_PER_CLASS, 1)):
        for shown in range(len(CLASSES)):
            label = (shown + shift) % len(CLASSES)
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
                image[..., shown] = rng.integers(200, 256, (SIZE, SIZE), dtype=np.uint8)
                name = f"{split}/{CLASSES[label]}/{shown}-{i:02d}.png"
                Image.fromarray(image).save(root / name)
                files[image.tobytes()] = File(name, label)
    assert len(files) == len(CLASSES) * (TRAIN_PER_CLASS + TEST_PER_CLASS)  # all distinct
    return files


class PixelBackbone(torch.nn.Module):
    """Stands in for the ResNet: its features are the input image's pixels (0-255, the input
    normalisation undone), so a feature row names the image it came from. Its mean and std
    buffers give a checkpoint an online backbone to save and load, as a ResNet's weights do."""

    def __init__(self):
        super().__init__()
        mean, std = data.NORMALIZATION["image_folder"]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x * self.std + self.mean) * 255).flatten(1)


def pixel_backbone(name, small_image, image_size, weights_path=None):
    """backbone.build_backbone's signature and return value."""
    return PixelBackbone(), 3 * SIZE * SIZE


def trace(rows: torch.Tensor, files: Dict[bytes, File]) -> List[Optional[File]]:
    """The file each feature row of PixelBackbone came from (None: no planted image)."""
    pixels = rows.detach().double().round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.view(-1, 3, SIZE, SIZE).permute(0, 2, 3, 1).contiguous().numpy()
    return [files.get(p.tobytes()) for p in pixels]


# ---- what the probe and the evaluation were handed --------------------------------------------


@dataclasses.dataclass
class Seen:
    """What one validation or evaluation learned from and reported, as files."""

    splits: Dict[int, List[File]] = dataclasses.field(default_factory=dict)  # by SPLIT_*
    scaled_by: List[List[File]] = dataclasses.field(default_factory=list)  # each standardisation
    heads_fit_on: List[Tuple[File, int]] = dataclasses.field(default_factory=list)  # (file, label)
    knn_bank: List[File] = dataclasses.field(default_factory=list)
    scale: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # the latest standardisation
    result: Dict = dataclasses.field(default_factory=dict)  # metrics, or evaluation.json


@contextlib.contextmanager
def watching(files: Dict[bytes, File]):
    """Wraps the functions through which features reach a classifier, a standardisation or the
    kNN, and records, as files, what each was handed."""
    seen = Seen()

    def record_splits(features, splits):
        seen.splits = {
            s: trace(features[splits == s], files) for s in (SPLIT_FIT, SPLIT_HOLDOUT, SPLIT_TEST)
        }

    def standardization(real):
        def recorded(train):
            seen.scaled_by.append(trace(train, files))
            seen.scale = real(train)
            return seen.scale

        return recorded

    def train_heads_on_features(real):
        def recorded(fit_features, fit_labels, *args):
            mean, std = seen.scale  # the heads get standardised features: undo it to trace them
            traced = trace(fit_features * std + mean, files)
            seen.heads_fit_on = list(zip(traced, fit_labels.tolist()))
            return real(fit_features, fit_labels, *args)

        return recorded

    def knn_accuracy(real):
        def recorded(train_features, *args, **kwargs):
            seen.knn_bank = trace(train_features, files)
            return real(train_features, *args, **kwargs)

        return recorded

    def probe_metrics(real):
        def recorded(features, labels, splits, *args):
            record_splits(features, splits)
            seen.result = real(features, labels, splits, *args)
            return seen.result

        return recorded

    def extract_features(real):
        def recorded(*args):
            by_split = real(*args)
            features = torch.cat([by_split[s][0] for s in sorted(by_split)])
            splits = torch.cat([torch.full((len(by_split[s][0]),), s) for s in sorted(by_split)])
            record_splits(features, splits)
            return by_split

        return recorded

    def augmented_images(real):
        def recorded(source, *args):
            images = source.load_many(range(len(source)))
            traced = [files.get(np.asarray(image.decode()).tobytes()) for image in images]
            seen.heads_fit_on = list(zip(traced, source.labels.tolist()))
            return real(source, *args)

        return recorded

    with pytest.MonkeyPatch.context() as patch:
        for module, name, wrapper in (
            (probe, "standardization", standardization),
            (linear_eval, "standardization", standardization),
            (probe, "train_heads_on_features", train_heads_on_features),
            (linear_eval, "train_heads_on_features", train_heads_on_features),
            (probe, "knn_accuracy", knn_accuracy),
            (reducers, "probe_metrics", probe_metrics),
            (linear_eval, "extract_features", extract_features),
            (linear_eval, "AugmentedImages", augmented_images),
        ):
            patch.setattr(module, name, wrapper(getattr(module, name)))
        yield seen


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    files = write_planted_folders(root / "images")
    return root, files


@pytest.fixture(scope="module")
def seen(planted):
    """{place: Seen} of one validation (the real training command, 3 steps, validating after
    them) and two evaluations of its checkpoint (evaluate_result.py, cached and augmented)."""
    root, files = planted
    config = tiny_config(
        root,
        epochs=1,
        classifier_lrs=[STILL, LEARNS],
        classifier_holdout_fraction=HOLDOUT_FRACTION,
        classifier_train_epochs=CLASSIFIER_EPOCHS,
    )
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(byol, "build_backbone", pixel_backbone)
        patch.setattr(checkpoint, "build_backbone", pixel_backbone)
        patch.chdir(ROOT)  # as a user runs it: Determined copies the working dir into checkpoints
        with watching(files) as out["validation"]:
            model_def.main(
                [
                    str(config),
                    "--checkpoint-dir",
                    str(root / "ckpt"),
                    *map(str, folder_overrides(root / "images")),
                ]
            )
        (uuid,) = os.listdir(root / "ckpt" / "determined")
        for place, flags in zip(PLACES[1:], (["--no-augment"], [])):
            output = root / f"{place}.json"
            with watching(files) as out[place]:
                evaluate_result.main(
                    [
                        "--checkpoint",
                        str(root / "ckpt" / "determined" / uuid),
                        "--classifier-train-epochs",
                        str(CLASSIFIER_EPOCHS),
                        "--output",
                        str(output),
                        *flags,
                    ]
                )
            out[place].result = json.loads(output.read_text())
    return out


def outcome(seen: Seen) -> Tuple[float, float, float, Dict[float, float]]:
    """(chosen LR, its held-out accuracy, its test accuracy, {LR: held-out accuracy}) from
    validation's metrics or from evaluation.json."""
    r = seen.result
    if "classifiers" in r:
        per_lr = {row["lr"]: row["holdout_accuracy"] for row in r["classifiers"]}
        return r["chosen_lr"], r["holdout_accuracy"], r["test_accuracy"], per_lr
    per_lr = {lr: r[f"classifier_lr_{lr:g}_holdout_accuracy"] for lr in (STILL, LEARNS)}
    return r["classifier_best_lr"], r["holdout_accuracy"], r["test_accuracy"], per_lr


def names(files: List[Optional[File]]) -> List[str]:
    return sorted(f.name if f else "<not a planted image>" for f in files)


def planted_names(files: Dict[bytes, File], split: str) -> List[str]:
    return sorted(f.name for f in files.values() if f.name.startswith(f"{split}/"))


# ---- the rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("place", PLACES)
def test_the_classifier_learning_rate_is_chosen_on_held_out_training_images_never_on_test_images(
    seen, planted, place
):
    """The held-out images are training images that no head was fit on. On them the head whose
    LR learns is right every time, the head whose LR cannot move is not; on the test images
    (labelled with the next class) the learning head is wrong every time. So chosen on
    held-out images: LR 0.1, held-out accuracy 1.0, test accuracy 0.0. Chosen on test images it
    would be 1e-7 (its test accuracy is at least 0.0, and ties go to the smaller LR)."""
    _, files = planted
    held, fit = seen[place].splits[SPLIT_HOLDOUT], seen[place].splits[SPLIT_FIT]
    assert names(held + fit) == planted_names(files, "train")  # split between the two, no overlap
    assert Counter(f.label for f in held) == {c: HELD_PER_CLASS for c in range(len(CLASSES))}

    chosen, held_accuracy, test_accuracy, per_lr = outcome(seen[place])
    assert per_lr[LEARNS] == 1.0 and per_lr[STILL] < 1.0
    assert (chosen, held_accuracy, test_accuracy) == (LEARNS, 1.0, 0.0)


@pytest.mark.parametrize("place", PLACES)
def test_no_classifier_standardisation_or_knn_learns_from_a_test_image(seen, planted, place):
    """Every test image is scored, once; the standardisation's statistics and the linear heads
    come from the fit images alone (each with its own label); validation's kNN votes with the
    labeled training images only, so on test images labelled with the next class it is wrong
    every time."""
    _, files = planted
    s = seen[place]
    fit = s.splits[SPLIT_FIT]
    assert names(s.splits[SPLIT_TEST]) == planted_names(files, "test")
    assert len(fit) == len(CLASSES) * (TRAIN_PER_CLASS - HELD_PER_CLASS)
    assert set(names(fit)) <= set(planted_names(files, "train"))
    assert s.scaled_by, "no standardisation was computed"
    for rows in s.scaled_by:
        assert names(rows) == names(fit)
    trained_on = sorted((f.name if f else "<not a planted image>", y) for f, y in s.heads_fit_on)
    assert trained_on == sorted((f.name, f.label) for f in fit)
    if place == "validation":
        assert names(s.knn_bank) == planted_names(files, "train")
        assert s.result["knn_accuracy"] == 0.0


def with_searcher(raw, metric, smaller_is_better, validate_with_classifier=True):
    config = yaml.safe_load(yaml.safe_dump(raw))
    config["searcher"].update(metric=metric, smaller_is_better=smaller_is_better)
    config["hyperparameters"]["validate_with_classifier"] = validate_with_classifier
    return config


def test_a_searcher_or_checkpoint_policy_best_chooses_only_by_a_held_out_metric(seen):
    """Of every metric validation reports, a config may name only holdout_accuracy (larger is
    better) as the searcher metric, which ASHA and `checkpoint_policy: best` choose by;
    without the probe only validation_loss (smaller is better). Anything else is refused."""
    with open(os.path.join(ROOT, "const-cifar10.yaml")) as f:
        raw = yaml.safe_load(f)
    reported = sorted(seen["validation"].result)
    assert {"holdout_accuracy", "test_accuracy", "knn_accuracy"} <= set(reported)
    allowed = {(True, "holdout_accuracy", False), (False, "validation_loss", True)}
    for with_probe in (True, False):
        for metric in reported + ["validation_loss"]:
            for smaller in (True, False):
                config = with_searcher(raw, metric, smaller, with_probe)
                if (with_probe, metric, smaller) in allowed:
                    parse_experiment_config(config)
                else:
                    with pytest.raises(ConfigError, match="searcher"):
                        parse_experiment_config(config)


def test_evaluate_result_evaluates_the_checkpoint_best_on_held_out_images_not_on_test_images(
    tmp_path,
):
    """`evaluate_result.py --experiment-id` against the master stand-in, whose experiment holds
    three checkpoints: best by holdout_accuracy at step 10, best by test_accuracy (and kNN) at
    step 20. The evaluation experiment it submits evaluates step 10's checkpoint and itself
    chooses by holdout_accuracy."""
    from cluster import SCHEMAS, Cluster

    if not SCHEMAS.is_dir():
        pytest.skip("needs the master's expconf schemas in ../shared/tools/expconf")
    with open(os.path.join(ROOT, "const-cifar10.yaml")) as f:
        config = yaml.safe_load(f)
    with Cluster(tmp_path) as cluster:
        experiment_id = cluster.create_experiment(config)
        trial = cluster.add_trial(experiment_id)
        for step, holdout, test in ((10, 0.9, 0.3), (20, 0.6, 0.8), (30, 0.7, 0.5)):
            trial.metrics.append(
                {
                    "group": "validation",
                    "steps": step,
                    "metrics": {
                        "holdout_accuracy": holdout,
                        "test_accuracy": test,
                        "knn_accuracy": test,
                    },
                }
            )
            trial.checkpoints.append(
                bindings.v1Checkpoint(
                    metadata={"steps_completed": step},
                    resources={"state_dict.pth": "1"},
                    state=bindings.checkpointv1State.COMPLETED,
                    training=bindings.v1CheckpointTrainingMetadata(),
                    uuid=f"checkpoint-of-step-{step}",
                    allocationId=f"{experiment_id}.{trial.id}.1",
                    reportTime="2026-11-28T00:00:00Z",
                    taskId=f"{experiment_id}.{trial.id}",
                )
            )
        _, submitted = cluster.submit_evaluation(experiment_id)
        assert cluster.master.refused == []
    assert submitted["entrypoint"][2:4] == ["--checkpoint-uuid", "checkpoint-of-step-10"]
    assert submitted["searcher"]["metric"] == "holdout_accuracy"
    assert submitted["searcher"]["smaller_is_better"] is False


def pretrain(config, download_dir, checkpoint_dir):
    """The real training command on STL-10 files in `download_dir`: every batch handed to
    train_batch, and the steps and state of the checkpoint written at the end. The backbone is
    PixelBackbone (no label can reach it but through the views, and it keeps the run short):
    the projector and predictor learn from the views themselves."""
    batches = []
    real = model_def.BYOLTrial.train_batch

    def recorded(self, batch, epoch_idx, batch_idx):
        batches.append({name: tensor.clone() for name, tensor in batch.items()})
        return real(self, batch, epoch_idx, batch_idx)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_def.BYOLTrial, "train_batch", recorded)
        patch.setattr(byol, "build_backbone", pixel_backbone)
        patch.chdir(ROOT)
        model_def.main(
            [
                str(config),
                "--checkpoint-dir",
                str(checkpoint_dir),
                "--set",
                f"data.download_dir={download_dir}",
            ]
        )
    (uuid,) = os.listdir(checkpoint_dir / "determined")
    saved = checkpoint_dir / "determined" / uuid
    steps = json.loads((saved / "metadata.json").read_text())["steps_completed"]
    return batches, steps, checkpoint.load_state(str(saved / "state_dict.pth"))


def test_labels_never_reach_pretraining_permuting_them_leaves_the_run_bit_identical(
    tmp_path, no_md5
):
    """STL-10 as its binary files (10 labeled training images, 12 unlabeled), pretrained twice:
    once with its labels, once with the same images' labels permuted. Every batch handed to the
    training step, and the weights and optimizer state after the 4 steps, are bit for bit the
    same. The unlabeled images count as much as the labeled: 22 // 8 = 2 steps an epoch."""
    for name in ("labels", "permuted"):
        write_stl10(tmp_path / name, train_count=10, unlabeled_count=12, test_count=6)
    labels_file = tmp_path / "permuted" / "stl10_binary" / "train_y.bin"
    labels = np.fromfile(labels_file, dtype=np.uint8)
    permuted = np.roll(labels, 1)
    assert (permuted != labels).any()
    permuted.tofile(labels_file)

    config = tiny_config(tmp_path, dataset_name="stl10", epochs=2)
    raw = yaml.safe_load(config.read_text())
    # No validation or checkpoint between steps: Determined validates and checkpoints once,
    # after the last step (validation reads the labels, but changes no weight).
    raw.update(min_validation_period={"batches": 0}, min_checkpoint_period={"batches": 0})
    config.write_text(yaml.safe_dump(raw))
    (batches, steps, last), (permuted_batches, permuted_steps, permuted_last) = (
        pretrain(config, tmp_path / name, tmp_path / f"ckpt-{name}")
        for name in ("labels", "permuted")
    )
    assert steps == permuted_steps == 4 and len(batches) == len(permuted_batches) == 4
    for batch, permuted_batch in zip(batches, permuted_batches):
        assert batch.keys() == permuted_batch.keys()
        for name in batch:
            assert torch.equal(batch[name], permuted_batch[name]), name
    for part in ("models_state_dict", "optimizers_state_dict"):
        torch.testing.assert_close(last[part], permuted_last[part], rtol=0, atol=0)
