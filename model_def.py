#!/usr/bin/env python3
"""BYOL as a Determined PyTorchTrial, and the command that trains it (locally or on a cluster).

    python model_def.py const-cifar10.yaml [--set hyperparameters.epochs=3] [--resume CKPT]

One training step (BYOL paper, Section 3.1):
    two augmented views of each image -> online network (backbone, projector, predictor) and
    target network (EMA copy of backbone + projector) -> symmetrised regression loss ->
    LARS step on the online network -> EMA step of the target.
"""

import functools
import logging
from typing import Any, Dict, List, Optional

import torch
from determined import pytorch

import byol
import checkpoint
import data
import device
import device_decode
import launcher
import optim
import preflight
import sources
from augment import TwoViewAugmentation
from config import ConfigError, parse_experiment_config
from divergence import Divergence, FiniteCheck, ValidationGuard
from nonfinite import NonFiniteGuard
from probe import labeled_parts
from progress import ValidationSummary
from reducers import LinearProbeReducer, TrainingMetricsReducer
from searcher_stop import SearcherStopCheck

logger = logging.getLogger("byol")

# What the line after each validation shows, in order: what the run chooses by first.
BYOL_SUMMARY = ("holdout_accuracy", "test_accuracy", "knn_accuracy", "validation_loss")


class BYOLTrial(launcher.Trial):
    """Built from an ExperimentConfig (launcher.Trial keeps it as hp, data_config and run)."""

    def build(self) -> None:
        self.startup.step(self._build_data)
        self._build_network()
        self.optimizer = self.context.wrap_optimizer(optim.build_optimizer(self.network, self.hp))
        self._build_metrics()

    def _build_data(self) -> None:
        """Splits, the epoch sampler and schedules, and where and how views are made."""
        hp, startup = self.hp, self.startup
        if hp.sync_batchnorm and self.slots > 1 and self.device.type != "cuda":
            raise ConfigError(
                "hyperparameters.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm does "
                "not run on CPU processes; set it to false for CPU multi-process training"
            )
        self.splits = splits = data.build_splits(
            hp.dataset_name, self.data_config, startup.share, startup.first_on_machine
        )
        if hp.validate_with_classifier:  # labeled images exist (config.has_labels)
            self.num_classes = len(splits.labeled_train.classes)
            data.check_probe_classes(splits.labeled_train.classes, True)
        byol_train = splits.byol_train
        self.build_sampler(len(byol_train), data.epoch_order(byol_train, hp.global_batch_size))
        if self.data_config.strict_images:
            for source in (byol_train, splits.test):
                sources.verify_local_images(source)
        # One augmentation for the run: it plans the crops in the loader and makes the views
        # there (augment_on: loader) or on the device, where the JPEGs may be decoded too.
        self.augment = TwoViewAugmentation(hp.augmentation, *splits.normalization)
        self.augment_in_loader = device.augments_in_loader(hp.augment_on, self.device)
        decode_on = self.data_config.decode_on
        self.decode_on_device = data.decodes_on_device(decode_on, self.device, byol_train)
        self.compiles = device.compiles(hp.compile, self.device)
        self.augment_here = device.compiled_if(self.compiles, self.augment, "the augmentation")
        self.channels_last = device.uses_channels_last(self.device, hp.backbone_name)
        self.normalize = device.Normalize(*splits.normalization, self.device, self.channels_last)
        self.autocast_dtype = device.autocast_dtype(hp.precision, self.device)

    def _build_network(self) -> None:
        """Online and target networks in one module: `self.network` is the plain module (its
        parts, the EMA step), `self.wrapped_network` the same module as Determined wrapped it
        (DistributedDataParallel over several slots) for the training forward pass."""
        network = byol.build_network(self.hp, self.hp.pretrained_weights)
        if self.hp.sync_batchnorm and self.slots > 1:
            network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        self.network = network
        self.wrapped_network = self.context.wrap_model(network)
        # BatchNorm's running statistics (the integer batch counts aside), screened each step.
        self.float_buffers = [b for b in network.buffers() if b.is_floating_point()]
        # Compiled around Determined's wrapper (DistributedDataParallel over several slots), so
        # the registered module and its checkpoint keys stay the plain network's.
        self.forward_network = device.compiled_if(
            self.compiles, self.wrapped_network, "the network"
        )

    def _build_metrics(self) -> None:
        """Training metrics, and the linear probe + kNN that validation reports."""
        is_chief = self.context.distributed.rank == 0
        metrics = TrainingMetricsReducer(
            self.hp.collapse_std_threshold, self.hp.global_batch_size, is_chief
        )
        self.training_metrics = self.context.wrap_reducer(metrics, for_validation=False)
        self.non_finite = NonFiniteGuard(self.device)
        self.divergence = Divergence(self)
        self.progress = self.build_progress(before_line=self.divergence.before_progress_line)
        self.steps_done = 0  # for the validation summary
        self.previous_loss: Optional[torch.Tensor] = None
        if self.hp.validate_with_classifier:
            distributed = self.context.distributed
            probe = LinearProbeReducer(
                self.num_classes, self.hp.probe, self.run.seed, self.device, distributed
            )
            self.probe = self.context.wrap_reducer(probe, for_training=False)

    # ---- data ------------------------------------------------------------------------------

    def build_training_data_loader(self) -> pytorch.DataLoader:
        images, in_loader = self.splits.byol_train, self.augment_in_loader
        dataset = data.TrainImages(
            images, self.augment, self.run.seed, self.corrupt_log, in_loader, self.decode_on_device
        )
        return self.batch_loader(dataset, self.train_sampler)

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        splits, seed = self.splits, self.run.seed
        if self.hp.validate_with_classifier:
            fraction = self.hp.probe.holdout_fraction
            parts = labeled_parts(splits.labeled_train, splits.test, fraction, seed)
            return self.labeled_images_loader(parts, self.augment.size)
        # Without the probe, validation scores the BYOL loss on fixed views of the test images
        # (without labeled folders, of held-out images: data.loss_holdout).
        dataset = data.TrainImages(splits.test, self.augment, seed, self.corrupt_log)
        batches = data.fixed_view_batches(len(splits.test), self.train_sampler.per_slot_batch)
        return self.batch_loader(dataset, batches)

    # ---- training --------------------------------------------------------------------------

    def two_views(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[2B, 3, S, S]: view 1 of every image, then view 2 (made in the loader or here)."""
        if "views" in batch:
            return device.memory_format(batch["views"], self.channels_last)
        images = batch["image"]
        if "jpeg" in batch:  # the loader read JPEG bytes: decoded here (data.decode_on)
            where, size = self.splits.byol_train.location, self.augment.size
            images = device_decode.crops(batch, size, self.device, where, self.corrupt_log)
        # Without gradients in training as in validation: no gradient flows into the views, and
        # the compiled augmentation keeps one graph for both (grad mode is part of its guard).
        with torch.no_grad():
            views = self.augment_here(images, batch["key"])
        return device.memory_format(views, self.channels_last)

    def forward_loss(self, views: torch.Tensor):
        """Online and target networks on both views -> the symmetrised BYOL loss."""
        with device.autocast(self.device, self.autocast_dtype):
            prediction, target_projection, online_projection = self.forward_network(views)
        return byol.byol_loss(prediction, target_projection), online_projection

    def train_batch(self, batch: launcher.Batch, epoch_idx: int, batch_idx: int) -> Dict[str, Any]:
        step = batch_idx  # optimizer steps completed before this one
        self.searcher_stop.exit_if_stopped(step)

        # Learning rate of this step: linear warmup, then half a cosine (optim.py).
        lr = self.set_learning_rate(step)

        # Two augmented views of each image; online and target networks; the BYOL loss.
        batch = self.to_device(batch)
        saved_buffers = self.non_finite.before_step(self.float_buffers)
        loss, online_projection = self.forward_loss(self.two_views(batch))
        self.context.backward(loss)

        # No host sync in the step: a non-finite step's update is skipped on the device (its
        # BatchNorm statistics put back) and the host stops the run at its next wait
        # (divergence.py), before any report or checkpoint.
        grads = self.optimizer.gradients()
        finite = self.non_finite.screen(loss, grads, step, self.float_buffers, saved_buffers)

        # LARS step (AdamW for transformers) on the online network: backbone, projector,
        # predictor.
        self.optimizer.apply_only_if(finite)
        self.context.step_optimizer(self.optimizer)

        # EMA step: the target network moves towards the online one by 1 - tau.
        tau = optim.ema_tau_at(step, self.total_steps, self.hp.tau_base)
        self.network.update_target(tau, apply=finite)

        # Metrics stay on the device until Determined reports them.
        self.training_metrics.update(
            loss=loss.detach(),
            representation_std=byol.representation_std(online_projection),
            corrupt_images=batch["corrupt"].sum(),
        )
        self.previous_loss = loss.detach()
        self.steps_done = step + 1
        self.progress.step_done(self.steps_done, self.previous_loss)
        # Python floats: Determined averages them per report without touching the device.
        return {"learning_rate": lr, "tau": tau}

    # ---- validation ------------------------------------------------------------------------

    def evaluate_batch(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> Dict[str, Any]:
        batch = self.to_device(batch)
        if not self.hp.validate_with_classifier:
            loss, _ = self.forward_loss(self.two_views(batch))
            return {"validation_loss": loss}
        valid = batch["valid"].bool()
        with device.autocast(self.device, self.autocast_dtype):
            features = self.network.online_backbone(self.normalize(batch["image"][valid]))
        self.probe.update(
            features, batch["label"][valid], batch["split"][valid], batch["index"][valid]
        )
        return {}

    def build_callbacks(self) -> Dict[str, pytorch.PyTorchCallback]:
        return {
            "finite": FiniteCheck(self.divergence),
            # Before the summary: it sees (and the master gets) the guarded metrics.
            "validation_guard": ValidationGuard(self.divergence),
            "checkpoint_marker": checkpoint.CompleteCheckpoint(self, checkpoint.TRIAL_SPEC),
            "summary": ValidationSummary(self, BYOL_SUMMARY),
            "searcher_stop": SearcherStopCheck(self),
        }

    def description(self) -> Dict[str, Any]:
        hp = self.hp
        size = hp.augmentation.image_size
        return self.network_record(hp.backbone_name, hp.cifar_stem, size, self.splits.normalization)


# ------------------------------------------------------------------------------------------
# Command line: local training through Determined's Trainer, or the cluster entrypoint
# (launcher.py, shared with the fine-tuning trial)
# ------------------------------------------------------------------------------------------


BYOL = launcher.TrialKind(
    trial_spec=checkpoint.TRIAL_SPEC,
    parse=parse_experiment_config,
    build=BYOLTrial,
    check=preflight.run_check,
    usage=__doc__,
    example="python model_def.py const-cifar10.yaml",
    default_checkpoint_dir="checkpoints-byol",
    example_set="hyperparameters.global_batch_size=128",
    schedules="the LR and EMA schedules",
    # A local run has no searcher: a labeled config's metric follows a label-free folder.
    parse_local=functools.partial(parse_experiment_config, local=True),
)


def main(argv: Optional[List[str]] = None) -> None:
    launcher.main(BYOL, argv)


if __name__ == "__main__":
    launcher.run_as_main("model_def")
