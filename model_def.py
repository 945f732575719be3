"""BYOL as a Determined PyTorchTrial, and the command that trains it (locally or on a cluster).

    python model_def.py const-cifar10.yaml [--set hyperparameters.epochs=3] [--resume CKPT]

One training step (BYOL paper, Section 3.1):
    two augmented views of each image -> online network (backbone, projector, predictor) and
    target network (EMA copy of backbone + projector) -> symmetrised regression loss ->
    LARS step on the online network -> EMA step of the target.
"""

import functools
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from determined import pytorch

import byol
import checkpoint
import data
import device
import launcher
import nonfinite
import optim
import preflight
import sources
from augment import TwoViewAugmentation
from backbone import build_backbone
from config import (
    HELD_OUT_METRICS,
    ConfigError,
    parse_experiment_config,
)
from nonfinite import NonFiniteGuard, NonFiniteLossError, TrialDiverged
from probe import SPLIT_FIT, SPLIT_HOLDOUT, SPLIT_TEST
from progress import Progress, ValidationSummary
from reducers import LinearProbeReducer, TrainingMetricsReducer
from searcher_stop import SearcherStop

logger = logging.getLogger("byol")

# What the line after each validation shows, in order: what the run chooses by first.
BYOL_SUMMARY = ("holdout_accuracy", "test_accuracy", "knn_accuracy", "validation_loss")


class BYOLTrial(launcher.Trial):
    """Built from an ExperimentConfig (launcher.Trial keeps it as hp, data_config and run)."""

    def build(self) -> None:
        self.on_cuda = self.device.type == "cuda"
        self.searcher_stop = SearcherStop(self.context._core, self.trial_id)
        # On a cluster a diverged trial ends once, ranked last (stop_diverged); locally the run
        # stops with NonFiniteLossError's line.
        self.on_cluster = self.trial_id is not None
        self.startup.step(self._check_devices)
        self.startup.step(self._build_data)
        self._build_network()
        self._build_optimizer()
        self._build_metrics()

    def _check_devices(self) -> None:
        if self.hp.sync_batchnorm and self.slots > 1 and not self.on_cuda:
            raise ConfigError(
                "hyperparameters.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm does "
                "not run on CPU processes; set it to false for CPU multi-process training"
            )

    def _build_data(self) -> None:
        """Splits, the epoch sampler, the schedules' lengths, and where views are made."""
        self.splits = data.build_splits(
            self.hp.dataset_name,
            self.data_config,
            self.startup.share,
            self.startup.first_on_machine,
        )
        if self.hp.validate_with_classifier:  # labeled images exist (config.has_labels)
            self.num_classes = len(self.splits.labeled_train.classes)
            data.check_probe_classes(self.splits.labeled_train.classes, True)
        self.train_sampler = data.EpochBatchSampler(
            len(self.splits.byol_train),
            self.hp.global_batch_size,
            self.slots,
            self.run.seed,
            order=data.epoch_order(self.splits.byol_train, self.hp.global_batch_size),
        )
        self.batches_per_epoch = self.train_sampler.batches_per_epoch
        self.total_steps = self.hp.epochs * self.batches_per_epoch
        self.warmup_steps = int(round(self.hp.warmup_epochs * self.batches_per_epoch))
        self.corrupt_log = data.CorruptImageLog(self.data_config.strict_images)
        if self.data_config.strict_images:
            for source in (self.splits.byol_train, self.splits.test):
                sources.verify_local_images(source)
        self.num_workers = data.loader_workers(
            self.data_config.num_workers, announce=self.context.distributed.rank == 0
        )
        # One augmentation for the run: it plans the crops in the loader and makes the views
        # there (augment_on: loader) or on the device.
        self.augment = TwoViewAugmentation(self.hp.augmentation, *self.splits.normalization)
        augment_on = self.hp.augment_on
        if augment_on == "auto":
            augment_on = "device" if self.on_cuda else "loader"
        self.augment_in_loader = augment_on == "loader"
        self.compiles = device.compiles(self.hp.compile, self.device)
        self.augment_here = (
            device.CompiledOrEager(self.augment, "the augmentation")
            if self.compiles
            else self.augment
        )
        self.channels_last = device.uses_channels_last(self.device, self.hp.backbone_name)
        self.normalize = device.Normalize(
            *self.splits.normalization, self.device, self.channels_last
        )

    def _build_network(self) -> None:
        """Online and target networks in one module: `self.network` is the plain module (its
        parts, the EMA step), `self.wrapped_network` the same module as Determined wrapped it
        (DistributedDataParallel over several slots) for the training forward pass."""
        backbone, feature_dim = build_backbone(
            self.hp.backbone_name,
            self.hp.cifar_stem,
            self.hp.augmentation.image_size,
            self.hp.pretrained_weights,
        )
        network = byol.BYOLNetwork(
            backbone, feature_dim, self.hp.projector_hidden_dim, self.hp.projection_dim
        )
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
        self.forward_network = (
            device.CompiledOrEager(self.wrapped_network, "the network")
            if self.compiles
            else self.wrapped_network
        )

    def _build_optimizer(self) -> None:
        """LARS or AdamW on the online network (the target network is not trained, only
        averaged); the same two parameter groups either way."""
        groups = optim.parameter_groups(self.network, self.hp.weight_decay)
        if self.hp.optimizer == "lars":
            optimizer = optim.LARS(
                groups,
                lr=0.0,
                momentum=self.hp.lars_momentum,
                trust_coefficient=self.hp.lars_trust_coefficient,
            )
        else:
            optimizer = optim.AdamW(groups, lr=0.0)
        self.optimizer = self.context.wrap_optimizer(optimizer)
        self.autocast_dtype = device.autocast_dtype(self.hp.precision, self.device)

    def _build_metrics(self) -> None:
        """Training metrics, and the linear probe + kNN that validation reports."""
        is_chief = self.context.distributed.rank == 0
        self.training_metrics = self.context.wrap_reducer(
            TrainingMetricsReducer(
                self.hp.collapse_std_threshold, self.hp.global_batch_size, is_chief
            ),
            for_training=True,
            for_validation=False,
        )
        self.non_finite = NonFiniteGuard(self.device)
        self.progress = Progress(
            self.total_steps,
            self.batches_per_epoch,
            self.hp.global_batch_size,
            is_chief,
            # Only the chief prints: on a cluster every slot must stop together, at the report
            # after the stretch (FiniteCheck), within one reporting period of the step.
            before_line=(lambda: None) if self.on_cluster else self.check_finite,
        )
        self.steps_done = 0  # for the validation summary
        self.previous_loss: Optional[torch.Tensor] = None
        if self.hp.validate_with_classifier:
            self.probe = self.context.wrap_reducer(
                LinearProbeReducer(
                    self.num_classes,
                    self.hp.probe,
                    self.run.seed,
                    self.device,
                    self.context.distributed,
                ),
                for_training=False,
            )

    # ---- data ------------------------------------------------------------------------------

    def build_training_data_loader(self) -> pytorch.DataLoader:
        dataset = data.TrainImages(
            self.splits.byol_train,
            self.augment,
            self.run.seed,
            self.corrupt_log,
            self.augment_in_loader,
        )
        return device.batch_loader(
            dataset, self.train_sampler, self.num_workers, self.device, pytorch.DataLoader
        )

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        if self.hp.validate_with_classifier:
            fit, held = data.holdout_split(
                self.splits.labeled_train.labels, self.hp.probe.holdout_fraction, self.run.seed
            )
            parts = [
                (sources.Subset(self.splits.labeled_train, fit), SPLIT_FIT),
                (sources.Subset(self.splits.labeled_train, held), SPLIT_HOLDOUT),
                (self.splits.test, SPLIT_TEST),
            ]
            return self.labeled_images_loader(parts, self.augment.size)
        # Without the probe, validation scores the BYOL loss on fixed views of the test images
        # (without labeled folders, of held-out images: data.loss_holdout).
        dataset = data.TrainImages(self.splits.test, self.augment, self.run.seed, self.corrupt_log)
        batches = data.fixed_view_batches(len(self.splits.test), self.train_sampler.per_slot_batch)
        return device.batch_loader(
            dataset, batches, self.num_workers, self.device, pytorch.DataLoader
        )

    def get_batch_length(self, batch: Dict[str, torch.Tensor]) -> int:
        return len(batch["key"] if "key" in batch else batch["label"])

    # ---- training --------------------------------------------------------------------------

    def two_views(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[2B, 3, S, S]: view 1 of every image, then view 2 (made in the loader or here)."""
        if "views" in batch:
            return device.memory_format(batch["views"], self.channels_last)
        # Without gradients in training as in validation: no gradient flows into the views, and
        # the compiled augmentation keeps one graph for both (grad mode is part of its guard).
        with torch.no_grad():
            views = self.augment_here(batch["image"], batch["key"])
        return device.memory_format(views, self.channels_last)

    def forward_loss(self, views: torch.Tensor):
        """Online and target networks on both views -> the symmetrised BYOL loss."""
        with device.autocast(self.device, self.autocast_dtype):
            prediction, target_projection, online_projection = self.forward_network(views)
        return byol.byol_loss(prediction, target_projection), online_projection

    def train_batch(
        self, batch: Dict[str, torch.Tensor], epoch_idx: int, batch_idx: int
    ) -> Dict[str, Any]:
        step = batch_idx  # optimizer steps completed before this one

        if self.searcher_stop.stop_requested():
            if self.context.distributed.rank == 0:
                logger.info("the searcher stopped this trial after step %d: exiting", step)
            # Determined's own exit, as for a preemption: a checkpoint unless the latest is of
            # this step, then exit 0. (set_stop_requested would be read only at the next
            # reporting boundary, after up to scheduling_unit more batches.)
            raise pytorch._ShouldExit()

        # Learning rate of this step: linear warmup, then half a cosine (optim.py).
        lr = optim.learning_rate_at(
            step, self.total_steps, self.warmup_steps, self.hp.peak_learning_rate
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        # Two augmented views of each image; online and target networks; the BYOL loss.
        batch = self.to_device(batch)
        saved_buffers = self.non_finite.before_step(self.float_buffers)
        loss, online_projection = self.forward_loss(self.two_views(batch))
        self.context.backward(loss)

        # No host sync in the step: a non-finite step's update is skipped on the device (its
        # BatchNorm statistics put back) and the host stops the run at its next wait
        # (check_finite, stop_if_diverged), before any report or checkpoint.
        grads = [
            p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        finite = self.non_finite.screen(loss, grads, step, self.float_buffers, saved_buffers)

        # LARS step on the online network (backbone, projector, predictor).
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

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if a step so far was not finite (waits for the device)."""
        self.non_finite.check(self.batches_per_epoch)

    def held_out_metric(self) -> Tuple[str, bool]:
        """The metric the searcher ranks by (it must be this one) and its smaller_is_better."""
        ((metric, smaller_is_better),) = HELD_OUT_METRICS[self.hp.validate_with_classifier].items()
        return metric, smaller_is_better

    def stop_if_diverged(self) -> None:
        """On a cluster, on every slot at the same point: whether any slot's step went
        non-finite (one allgather of the slots' records, so all agree on one line)."""
        record = nonfinite.agreed(self.context.distributed.allgather(self.non_finite.first()))
        if record is not None:
            self.stop_diverged(
                record.step,
                f"step {record.step} went non-finite (its loss: {record.loss:.6g}; the loss, a "
                f"gradient or a BatchNorm statistic overflowed)",
                record.loss_before,
            )

    def stop_diverged(self, step: int, what: str, last_finite_loss: Optional[float]) -> None:
        """A diverged trial on a cluster: every slot logs the same line, the chief reports the
        worst validation (nonfinite.worst_validation, which says why), and every slot raises
        TrialDiverged, which run_on_cluster turns into exit 0: no checkpoint is written after
        the divergence, the master does not restart the trial (exit 0 ends it COMPLETED, see
        nonfinite.py), and its latest checkpoint is the last finite state."""
        metric, smaller_is_better = self.held_out_metric()
        validation = nonfinite.worst_validation(
            metric,
            smaller_is_better,
            self.run.searcher,
            self.steps_done,
            self.steps_done // self.batches_per_epoch,
            step,
        )
        lr = optim.learning_rate_at(
            step, self.total_steps, self.warmup_steps, self.hp.peak_learning_rate
        )
        loss = "none" if last_finite_loss is None else f"{last_finite_loss:.6g}"
        line = (
            f"trial {self.trial_id} diverged: {what} (epoch {step // self.batches_per_epoch}), "
            f"learning rate {lr:.6g} at that step (hyperparameters.learning_rate="
            f"{self.hp.learning_rate:g}); last finite loss: {loss}. Stopped without a "
            f"checkpoint after it, not to be restarted; the searcher ranks it last ({metric} "
            f"{validation[metric]}). Lower hyperparameters.learning_rate and resume from the "
            f"trial's latest checkpoint: model_def.py --resume DIR --allow-config-change --set "
            f"hyperparameters.learning_rate=LOWER (README: 'A trial that diverges')"
        )
        logger.error("%s", line)
        if self.context.distributed.rank == 0:
            self.context._core.train.report_validation_metrics(
                steps_completed=self.steps_done, metrics=validation
            )
        raise TrialDiverged(line)

    def build_callbacks(self) -> Dict[str, pytorch.PyTorchCallback]:
        return {
            "finite": FiniteCheck(self),
            # Before the summary: it sees (and the master gets) the guarded metrics.
            "validation_guard": ValidationGuard(self),
            "checkpoint_marker": CheckpointMarker(self),
            "summary": ValidationSummary(self, BYOL_SUMMARY),
            "searcher_stop": SearcherStopCheck(self),
        }


class FiniteCheck(pytorch.PyTorchCallback):
    """After each stretch of training steps, before Determined reports metrics, validates or
    writes a checkpoint (it reads the metrics from the device there anyway): a non-finite step
    stops the run, so no report or checkpoint holds a non-finite state."""

    def __init__(self, trial: BYOLTrial):
        self.trial = trial

    def on_training_workload_end(self, avg_metrics: Dict[str, Any], batch_metrics: Any) -> None:
        if self.trial.on_cluster:
            self.trial.stop_if_diverged()
        else:
            self.trial.check_finite()


class ValidationGuard(pytorch.PyTorchCallback):
    """No validation reaches the master with a NaN, infinite or missing searcher metric, which
    errors the whole search (nonfinite.py). A model whose training loss stayed finite may still
    validate to NaN (BatchNorm's running statistics overflow in the forward passes of a
    diverging run, and validation uses them): a non-finite held-out metric stops the trial as
    a divergence (the worst validation instead of this one, on a cluster; NonFiniteLossError
    locally). Another metric that is not finite is left out: it cannot be computed.

    Determined's Trainer reports, after this callback, the very dict it passes here (broadcast
    from the chief first over several slots, so every slot decides alike): changes made here
    are what the master gets, and a raise here reports nothing and writes no checkpoint."""

    def __init__(self, trial: BYOLTrial):
        self.trial = trial

    def on_validation_end(self, metrics: Dict[str, Any]) -> None:
        trial = self.trial
        metric, _ = trial.held_out_metric()
        bad = nonfinite.non_finite_metrics(metrics)
        if metric in bad or metric not in metrics:
            what = f"validation at step {trial.steps_done} gave {metric}={metrics.get(metric)}"
            last = None if trial.previous_loss is None else float(trial.previous_loss)
            if not trial.on_cluster:
                raise NonFiniteLossError(
                    f"{what}; last training loss: {last}. Lower hyperparameters.learning_rate."
                )
            trial.stop_diverged(trial.steps_done, what, last)
        for name in bad:
            del metrics[name]
        if bad and trial.context.distributed.rank == 0:
            logger.warning(
                "validation at step %d: %s not finite, left out of the report",
                trial.steps_done,
                ", ".join(bad),
            )


class SearcherStopCheck(pytorch.PyTorchCallback):
    """After each validation (on every slot), the next batch first asks whether the searcher
    stopped the trial: the validation reaches the master after this callback returns."""

    def __init__(self, trial: BYOLTrial):
        self.trial = trial

    def on_validation_end(self, metrics: Dict[str, Any]) -> None:
        self.trial.searcher_stop.validated(self.trial.steps_done)


class CheckpointMarker(pytorch.PyTorchCallback):
    """Completes each checkpoint with checkpoint.MARKER, written last."""

    def __init__(self, trial: BYOLTrial):
        self.trial = trial

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        hp = self.trial.hp
        mean, std = self.trial.splits.normalization
        description = {
            "backbone_name": hp.backbone_name,
            "cifar_stem": hp.cifar_stem,
            "image_size": hp.augmentation.image_size,
            "dataset_name": hp.dataset_name,
            "normalization": {"mean": list(mean), "std": list(std)},
            "slots": self.trial.slots,
        }
        if self.trial.tensorboard_run is not None:
            description["tensorboard_run"] = self.trial.tensorboard_run
        checkpoint.write_marker(checkpoint_dir, description)
        if self.trial.context.distributed.rank == 0:
            logger.info("checkpoint written: %s", checkpoint_dir)


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
