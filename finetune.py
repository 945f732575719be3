#!/usr/bin/env python3
"""Fine-tuning a backbone with a new linear classifier, end to end, on labeled images: a Determined
PyTorchTrial and the command that runs it (locally, or on a cluster through launcher.py, as the
BYOL trial runs).

    python finetune.py finetune-cifar10.yaml --set hyperparameters.pretrained.checkpoint=CKPT_DIR
        [--set hyperparameters.label_fraction=0.1] [--resume CKPT] [--check]
    det -m HOST experiment create finetune-cifar10.yaml .    # pretrained.experiment_id: N

The backbone comes from hyperparameters.pretrained (pretrained.py): a BYOL checkpoint, a cluster
experiment's best checkpoint, an exported file, or random initialisation (the baseline).

Protocol, as the BYOL paper's semi-supervised evaluation follows SimCLR's:
  - labels: a class-balanced `label_fraction` of the labeled training images outside a held-out
    part (data.label_fraction_subset), listed in every checkpoint as labeled_subset.csv;
  - training: random-resized crops and horizontal flips (linear_eval.AugmentedImages), softmax
    cross-entropy, SGD with Nesterov momentum 0.9 and no weight decay by default, linear warmup
    then cosine decay (optim.learning_rate_at); BatchNorm in train mode (batch statistics), as
    the rest of the backbone is fine-tuned. backbone_lr_scale scales the backbone's LR; 0 freezes
    it (a linear probe, BatchNorm on its running statistics);
  - evaluation: centre crops of the held-out training images (holdout_accuracy, what a searcher
    and checkpoint_policy: best choose the LR and the epoch by) and of the test split
    (test_accuracy, reported, never used to choose).
"""

import csv
import io
import logging
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from determined import pytorch
from torch import nn

import checkpoint
import data
import device
import launcher
import pretrained
import sources
from backbone import build_backbone, load_backbone_weights
from config import (
    ConfigError,
    FineTuneHParams,
    default_crop_scale,
    parse_finetune_config,
)
from linear_eval import AugmentedImages
from preflight import run_finetune_check
from probe import SPLIT_HOLDOUT, SPLIT_TEST
from progress import ValidationSummary
from reducers import ClassifierAccuracyReducer
from searcher_stop import SearcherStopCheck

logger = logging.getLogger("byol")

TRIAL_SPEC = "finetune:FineTuneTrial"
SUBSET_FILE = "labeled_subset.csv"  # in every checkpoint: the labeled images trained on
SUMMARY = ("holdout_accuracy", "test_accuracy", "holdout_loss")


def subset_csv(labeled, indices) -> str:
    """The labeled images trained on, one per line: its name (path under the folder, or row of
    the dataset's training split) and its class."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "class"])
    names = sources.image_names(labeled, indices)
    writer.writerows(
        (name, labeled.classes[label]) for name, label in zip(names, labeled.labels[indices])
    )
    return out.getvalue()


def labeled_split(labeled, hp: FineTuneHParams, seed: int):
    """(the labeled subset trained on, the pool it is drawn from, the held-out images): indices
    into the labeled training images. Held-out images first, then the label fraction of the
    rest: the subset never holds a held-out image (the test split is a source of its own)."""
    pool, held = data.holdout_split(labeled.labels, hp.holdout_fraction, seed)
    chosen = data.label_fraction_subset(
        labeled.labels[pool], labeled.classes, hp.label_fraction, seed
    )
    return pool[chosen], pool, held


class Classifier(nn.Module):
    """A backbone and a new linear classifier on its pooled features. `frozen`: the backbone is
    not trained and stays in eval mode (a linear probe)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, frozen: bool):
        super().__init__()
        self.backbone, self.head, self.frozen = (
            backbone,
            nn.Linear(feature_dim, num_classes),
            frozen,
        )
        self.backbone.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class FineTuneTrial(launcher.Trial):
    """Built from a FineTuneConfig (launcher.Trial keeps it as hp, data_config and run)."""

    def build(self) -> None:
        # The backbone first: its source says what to build, and a missing one stops every
        # process with the same line before any data is read.
        self.startup.step(self._find_backbone)
        self.startup.step(self._build_data)
        self._build_model()
        self._build_optimizer()
        self._build_metrics()

    def _find_backbone(self) -> None:
        """The pretrained backbone (or none), and the architecture it fixes."""
        self.pretrained = pretrained.resolve(
            self.hp.pretrained, self.context._core, self.startup.share
        )
        self.backbone_name, self.cifar_stem, self.image_size = pretrained.architecture(
            self.hp, self.pretrained
        )

    def _build_data(self) -> None:
        """The labeled subset to train on, the held-out and test images, the epoch sampler."""
        hp = self.hp
        splits = data.build_splits(
            hp.dataset_name, self.data_config, self.startup.share, self.startup.first_on_machine
        )
        labeled = splits.labeled_train
        self.classes = list(labeled.classes)
        if len(self.classes) < 2:
            raise ConfigError(
                f"the labeled training images have {len(self.classes)} class(es) "
                f"({self.classes}); a classifier needs at least 2 class folders"
            )
        train_indices, fit_pool, held = labeled_split(labeled, hp, self.run.seed)
        self.subset_list = subset_csv(labeled, train_indices)
        self.train_images = sources.Subset(labeled, train_indices)
        self.holdout_images = sources.Subset(labeled, held)
        self.test_images = splits.test
        self.normalization = (
            self.pretrained.normalization if self.pretrained is not None else splits.normalization
        )
        self.build_sampler(len(self.train_images))
        self.crop_scale = hp.crop_scale or tuple(default_crop_scale(self.image_size))
        if self.context.distributed.rank == 0:
            logger.info(
                "fine-tuning on %d labeled images (label_fraction %g of %d outside the %d "
                "held-out ones), %d classes; test: %d images; backbone: %s",
                len(self.train_images),
                hp.label_fraction,
                len(fit_pool),
                len(held),
                len(self.classes),
                len(self.test_images),
                self.source_line(),
            )

    def source_line(self) -> str:
        if self.pretrained is None:
            return f"{self.backbone_name}, random initialisation"
        record = ", ".join(f"{k} {v}" for k, v in self.pretrained.record.items() if v is not None)
        return f"{self.backbone_name} (cifar_stem={self.cifar_stem}) from {record}"

    def _build_model(self) -> None:
        backbone, feature_dim = build_backbone(self.backbone_name, self.cifar_stem, self.image_size)
        if self.pretrained is not None:
            try:
                load_backbone_weights(
                    backbone,
                    self.pretrained.state,
                    self.backbone_name,
                    self.cifar_stem,
                    self.source_line(),
                )
            except ValueError as e:
                raise ConfigError(str(e)) from None
            # In the model now: the source's copy need not stay in memory for the whole run.
            self.pretrained = self.pretrained._replace(state=None)
        model = Classifier(backbone, feature_dim, len(self.classes), self.hp.frozen_backbone)
        channels_last = device.uses_channels_last(self.device, self.backbone_name)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.wrapped_model = self.context.wrap_model(model)
        self.normalize = device.Normalize(*self.normalization, self.device, channels_last)
        self.autocast_dtype = device.autocast_dtype(self.hp.precision, self.device)

    def _build_optimizer(self) -> None:
        """SGD with Nesterov momentum: the classifier at the scheduled LR, the backbone at
        backbone_lr_scale x that (not at all when frozen)."""
        groups = [{"params": list(self.model.head.parameters()), "lr_scale": 1.0}]
        if not self.hp.frozen_backbone:
            groups.append(
                {
                    "params": list(self.model.backbone.parameters()),
                    "lr_scale": self.hp.backbone_lr_scale,
                }
            )
        self.optimizer = self.context.wrap_optimizer(
            torch.optim.SGD(
                groups,
                lr=0.0,
                momentum=self.hp.momentum,
                nesterov=self.hp.momentum > 0,
                weight_decay=self.hp.weight_decay,
            )
        )

    def _build_metrics(self) -> None:
        self.progress = self.build_progress()
        self.steps_done = 0  # for the validation summary
        self.accuracy = self.context.wrap_reducer(
            ClassifierAccuracyReducer({SPLIT_HOLDOUT: "holdout", SPLIT_TEST: "test"}),
            for_training=False,
        )

    # ---- data ------------------------------------------------------------------------------

    def build_training_data_loader(self) -> pytorch.DataLoader:
        dataset = AugmentedImages(
            self.train_images,
            self.image_size,
            self.crop_scale,
            self.hp.crop_ratio,
            self.run.seed,
            self.corrupt_log,
        )
        return self.batch_loader(dataset, self.train_sampler)

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        return self.labeled_images_loader(
            [(self.holdout_images, SPLIT_HOLDOUT), (self.test_images, SPLIT_TEST)], self.image_size
        )

    # ---- training --------------------------------------------------------------------------

    def logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with device.autocast(self.device, self.autocast_dtype):
            return model(self.normalize(images)).float()

    def train_batch(self, batch: launcher.Batch, epoch_idx: int, batch_idx: int) -> Dict[str, Any]:
        step = batch_idx  # optimizer steps completed before this one
        self.searcher_stop.exit_if_stopped(step)

        # Learning rate of this step: linear warmup, then half a cosine; the backbone's scaled.
        lr = self.set_learning_rate(step)

        # Augmented labeled images -> backbone -> classifier -> cross-entropy (corrupt images,
        # blank in the batch, count for nothing).
        batch = self.to_device(batch)
        valid = batch["valid"].float()
        losses = F.cross_entropy(
            self.logits(self.wrapped_model, batch["image"]), batch["label"], reduction="none"
        )
        loss = (losses * valid).sum() / valid.sum().clamp(min=1)
        self.context.backward(loss)
        self.context.step_optimizer(self.optimizer)

        self.steps_done = step + 1
        self.progress.step_done(self.steps_done, loss.detach())
        return {"loss": loss.detach(), "learning_rate": lr}

    # ---- validation ------------------------------------------------------------------------

    def evaluate_batch(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> Dict[str, Any]:
        batch = self.to_device(batch)
        valid = batch["valid"].bool()
        labels = batch["label"][valid]
        logits = self.logits(self.model, batch["image"][valid])
        self.accuracy.update(
            batch["index"][valid],
            batch["split"][valid],
            (logits.argmax(1) == labels).float(),
            F.cross_entropy(logits, labels, reduction="none"),
        )
        return {}

    def build_callbacks(self) -> Dict[str, pytorch.PyTorchCallback]:
        return {
            "checkpoint_marker": checkpoint.CompleteCheckpoint(self, TRIAL_SPEC),
            "summary": ValidationSummary(self, SUMMARY),
            "searcher_stop": SearcherStopCheck(self),
        }

    # ---- what a checkpoint records -----------------------------------------------------------

    def description(self) -> Dict[str, Any]:
        return {
            **self.network_record(
                self.backbone_name, self.cifar_stem, self.image_size, self.normalization
            ),
            "classes": self.classes,
            "pretrained": (
                dict(self.pretrained.record, kind=self.hp.pretrained.kind)
                if self.pretrained is not None
                else {"kind": "random"}
            ),
            "label_fraction": self.hp.label_fraction,
            "labeled_images": len(self.train_images),
            "labeled_subset": SUBSET_FILE,
        }

    def checkpoint_files(self) -> Dict[str, str]:
        return {SUBSET_FILE: self.subset_list}


# ------------------------------------------------------------------------------------------
# Command line (launcher.py, shared with the BYOL trial)
# ------------------------------------------------------------------------------------------


FINETUNE = launcher.TrialKind(
    TRIAL_SPEC,
    parse_finetune_config,
    FineTuneTrial,
    run_finetune_check,
    __doc__,
    example="python finetune.py finetune-cifar10.yaml",
    default_checkpoint_dir="checkpoints-finetune",
    example_set="hyperparameters.label_fraction=0.1",
    schedules="the LR schedule",
)


def main(argv: Optional[List[str]] = None) -> None:
    launcher.main(FINETUNE, argv)


if __name__ == "__main__":
    launcher.run_as_main("finetune")
