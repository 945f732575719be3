"""BYOL as a Determined PyTorchTrial, and the command that trains it (locally or on a cluster).

    python model_def.py const-cifar10.yaml [--set hyperparameters.epochs=3] [--resume CKPT]

One training step (BYOL paper, Section 3.1):
    two augmented views of each image -> online network (backbone, projector, predictor) and
    target network (EMA copy of backbone + projector) -> symmetrised regression loss ->
    LARS step on the online network -> EMA step of the target.
"""

import argparse
import copy
import dataclasses
import json
import logging
import os
import pathlib
import sys
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import determined as det
import numpy as np
import torch
import torch.distributed as dist
from determined import core, pytorch

import byol
import checkpoint
import data
import device
import nonfinite
import optim
import preflight
import utils
from augment import TwoViewAugmentation
from backbone import build_backbone
from config import (
    HELD_OUT_METRICS,
    ConfigError,
    ExperimentConfig,
    Length,
    absolute_data_paths,
    add_set_option,
    apply_override,
    load_config,
    parse_experiment_config,
    result_changes,
)
from nonfinite import NonFiniteGuard, NonFiniteLossError, TrialDiverged
from probe import SPLIT_FIT, SPLIT_HOLDOUT, SPLIT_TEST
from progress import Progress
from reducers import LinearProbeReducer, TrainingMetricsReducer
from searcher_stop import SearcherStop
from startup import Startup, StartupFailed

logger = logging.getLogger("byol")


class BYOLTrial(pytorch.PyTorchTrial):
    def __init__(
        self,
        context: pytorch.PyTorchTrialContext,
        config: ExperimentConfig,
        trial_id: Optional[int] = None,
        startup: Optional[Startup] = None,
        tensorboard_run: Optional[str] = None,
    ) -> None:
        """`trial_id`: the trial's id on a cluster, where its searcher may stop it; None locally.
        `startup`: the processes' agreed start-up (startup.py), shared with the config's parsing.
        `tensorboard_run`: a local run's name (its TensorBoard folder), kept in its checkpoints."""
        self.context = context
        self.tensorboard_run = tensorboard_run
        self.hp, self.data_config, self.run = config.hparams, config.data, config.run
        self.slots = context.distributed.get_size()
        self.device = context.device
        self.on_cuda = self.device.type == "cuda"
        # Batches are copied by to_device() below, asynchronously from pinned memory;
        # Determined's automatic copy would block.
        context.experimental.disable_auto_to_device()
        self.searcher_stop = SearcherStop(context._core, trial_id)
        # On a cluster a diverged trial ends once, ranked last (stop_diverged); locally the run
        # stops with NonFiniteLossError's line.
        self.trial_id = trial_id
        self.on_cluster = trial_id is not None
        # Every process opens its data (and checks what else can fail here) before the first
        # collective of training; if any failed, all stop with the same line.
        self.startup = startup or Startup(context.distributed)
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
        self.num_classes = len(self.splits.labeled_train.classes)
        data.check_probe_classes(
            self.splits.labeled_train.classes, self.hp.validate_with_classifier
        )
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
                data.verify_local_images(source)
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
        self.normalize = device.Normalize(*self.splits.normalization, self.device)

    def _build_network(self) -> None:
        """Online and target networks in one module: `self.network` is the plain module (its
        parts, the EMA step), `self.wrapped_network` the same module as Determined wrapped it
        (DistributedDataParallel over several slots) for the training forward pass."""
        backbone, feature_dim = build_backbone(
            self.hp.backbone_name, self.hp.cifar_stem, self.hp.pretrained_weights
        )
        network = byol.BYOLNetwork(
            backbone, feature_dim, self.hp.projector_hidden_dim, self.hp.projection_dim
        )
        if self.hp.sync_batchnorm and self.slots > 1:
            network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
        if device.uses_channels_last(self.device):
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
        """LARS on the online network (the target network is not trained, only averaged)."""
        self.optimizer = self.context.wrap_optimizer(
            optim.LARS(
                optim.lars_param_groups(self.network, self.hp.weight_decay),
                lr=0.0,
                momentum=self.hp.lars_momentum,
                trust_coefficient=self.hp.lars_trust_coefficient,
            )
        )
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
        return pytorch.DataLoader(
            dataset,
            batch_sampler=self.train_sampler,
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0,
        )

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        if self.hp.validate_with_classifier:
            fit, held = data.holdout_split(
                self.splits.labeled_train.labels, self.hp.probe.holdout_fraction, self.run.seed
            )
            dataset = data.EvalImages(
                [
                    (data.Subset(self.splits.labeled_train, fit), SPLIT_FIT),
                    (data.Subset(self.splits.labeled_train, held), SPLIT_HOLDOUT),
                    (self.splits.test, SPLIT_TEST),
                ],
                self.augment.size,
                self.corrupt_log,
            )
            return pytorch.DataLoader(
                dataset,
                batch_size=self.train_sampler.per_slot_batch,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,  # they keep the crops
            )
        # Without labels, validation scores the BYOL loss on held-out images with fixed views.
        dataset = data.TrainImages(self.splits.test, self.augment, self.run.seed, self.corrupt_log)
        sampler = data.EpochBatchSampler(
            len(self.splits.test),
            self.train_sampler.per_slot_batch,
            1,
            self.run.seed,
            fixed_epoch=-1,
            order=data.epoch_order(self.splits.test, self.train_sampler.per_slot_batch),
        )
        return pytorch.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def get_batch_length(self, batch: Dict[str, torch.Tensor]) -> int:
        return len(batch["key"] if "key" in batch else batch["label"])

    # ---- training --------------------------------------------------------------------------

    def to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {name: t.to(self.device, non_blocking=True) for name, t in batch.items()}

    def two_views(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[2B, 3, S, S]: view 1 of every image, then view 2 (made in the loader or here)."""
        views = (
            batch["views"] if "views" in batch else self.augment_here(batch["image"], batch["key"])
        )
        return device.memory_format(views, self.device)

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
            "summary": ValidationSummary(self),
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


class ValidationSummary(pytorch.PyTorchCallback):
    """One line after each validation, on the chief: what the run chooses by first."""

    NAMES = ("holdout_accuracy", "test_accuracy", "knn_accuracy", "validation_loss")

    def __init__(self, trial: BYOLTrial):
        self.trial = trial

    def on_validation_end(self, metrics: Dict[str, Any]) -> None:
        if self.trial.context.distributed.rank != 0:
            return
        shown = ", ".join(f"{n} {float(metrics[n]):.4f}" for n in self.NAMES if n in metrics)
        logger.info("validation at step %d: %s", self.trial.steps_done, shown)


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
# ------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "config", nargs="?", help="experiment config yaml (not needed on a cluster)"
    )
    add_set_option(parser, "hyperparameters.global_batch_size=128")
    parser.add_argument(
        "--checkpoint-dir",
        default="checkpoints-byol",
        help="where local checkpoints go (keep it out of the source tree's .detignore-d paths)",
    )
    parser.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue from this checkpoint directory, with the config it was trained with "
        "(plus --set values); a config or --set that changes the result is refused",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue even though the config changes the result",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check CONFIG as a cluster's trials would parse it, at every corner of its "
        "hyperparameter search space, and its data locations reachable from here; then exit "
        "(0: ok, 1: problems). Nothing is trained or downloaded",
    )
    parser.add_argument(
        "--plot",
        action="store_true",
        help="at the end, draw the run's curves.png beside its TensorBoard files",
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    info = None
    try:
        import determined as det

        info = det.get_cluster_info()
    except Exception:
        pass
    if info is not None and info.task_type == "TRIAL":
        run_on_cluster(info)
        return
    args = parse_args(argv)
    if args.check:
        if args.config is None or args.resume is not None:
            sys.exit("error: --check takes an experiment config yaml (and --set), not --resume")
        sys.exit(preflight.run_check(args.config, args.overrides))
    if args.config is None and args.resume is None:
        sys.exit(
            "error: give an experiment config yaml, e.g. python model_def.py const-cifar10.yaml"
        )
    try:
        run_locally(args)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except data.CorruptImageError as e:  # data.strict_images: true
        sys.exit(f"error: {e.one_line} (data.strict_images is true: fix or remove the image)")


def training_lengths(trial: BYOLTrial) -> Dict[str, Any]:
    """The Trainer's lengths from the typed config. The run is `epochs` long, in Determined's
    epochs (what searcher.time_metric: epochs counts); a period of 0 means never."""

    def period(length: Length) -> Optional[pytorch.Batch]:
        batches = length.batches(trial.batches_per_epoch)
        return pytorch.Batch(batches) if batches > 0 else None

    return {
        "max_length": pytorch.Epoch(trial.hp.epochs),
        "validation_period": period(trial.run.validation_period),
        "checkpoint_period": period(trial.run.checkpoint_period),
        "reporting_period": pytorch.Batch(trial.run.reporting_period),
    }


def run_on_cluster(info) -> None:
    """The trial as the master started it: resolved hyperparameters from `info.trial.hparams`
    (the expanded config holds them in the master's {type: const, val: ...} form), the rest
    of the experiment config as the user wrote it, and the trial's own seed.

    A diverged trial (BYOLTrial.stop_diverged) reports its worst validation and exits 0 on every
    process, which ends it COMPLETED, not restarted (nonfinite.py says why not det.InvalidHP).

    A config error, or a start-up problem on any process (startup.py), ends the trial as
    Determined's invalid hyperparameters: every process logs the same line, reports the early
    exit and exits 0, so the master does not restart the trial (max_restarts). Determined
    0.38.1 then ends the trial COMPLETED, and its searcher does not replace it: ASHA's
    INVALID_HP branch is not reached since 0.26 (trial.go ends the trial through exit(nil)), so
    a search whose every trial hits the error ends COMPLETED after max_concurrent_trials
    trials. `python model_def.py CONFIG --check` finds config errors before that."""
    raw = dict(info.trial._config, hyperparameters=info.trial.hparams)
    with pytorch.init(hparams=info.trial.hparams, exp_conf=info.trial._config) as context:
        startup = Startup(context.distributed)
        try:
            config = startup.step(
                lambda: parse_experiment_config(raw, context.distributed.get_size())
            )
            config = dataclasses.replace(
                config, run=dataclasses.replace(config.run, seed=info.trial.trial_seed)
            )
            trial = BYOLTrial(context, config, info.trial.trial_id, startup)
            try:
                pytorch.Trainer(trial, context).fit(
                    **training_lengths(trial),
                    checkpoint_policy=config.run.checkpoint_policy,
                    step_zero_validation=config.run.initial_validation,
                    latest_checkpoint=info.latest_checkpoint,
                    # As Determined's harness passes it for a Trainer (exec/harness.py).
                    profiling_enabled=config.run.profiling,
                )
            except TrialDiverged:
                # Logged and reported on the way (BYOLTrial.stop_diverged). Leaving
                # pytorch.init's context normally flushes the report; every process exits 0.
                return
        except ConfigError as e:
            # StartupFailed (a ConfigError) reaches every process; a plain ConfigError (a lone
            # process, or raised after start-up) is the chief's to log.
            if isinstance(e, StartupFailed) or context.distributed.rank == 0:
                logger.error("invalid config: %s", e)
            # core.Context.__exit__ reports EarlyExitReason.INVALID_HP and exits with 0.
            raise det.InvalidHP(str(e)) from None


def fit_locally(trial: BYOLTrial, context, lengths: Dict[str, Any], resume: Optional[str]) -> None:
    """What `Trainer(trial, context).fit(...)` does off-cluster, except that a resumed run
    continues at the checkpoint's step, a cluster trial's checkpoint too. Determined 0.38.1's local Trainer restores the weights
    but restarts its batch count at 0 (it forces steps_completed=0 off-cluster), which would
    replay the data order and the LR/EMA schedules from the start."""
    steps_completed = 0
    if resume is not None:
        with open(os.path.join(resume, "metadata.json")) as f:
            steps_completed = int(json.load(f)["steps_completed"])
    controller = pytorch._PyTorchTrialController(
        trial_inst=trial,
        context=context,
        checkpoint_period=lengths["checkpoint_period"] or pytorch.Batch(sys.maxsize),
        validation_period=lengths["validation_period"] or pytorch.Batch(sys.maxsize),
        reporting_period=lengths["reporting_period"],
        max_length=lengths["max_length"],
        smaller_is_better=True,
        steps_completed=steps_completed,
        latest_checkpoint=resume,
        local_training=True,
        test_mode=False,
        searcher_metric_name=None,
        checkpoint_policy="all",
        step_zero_validation=trial.run.initial_validation,
        global_batch_size=None,
        profiling_enabled=False,
    )
    if resume is not None:
        # The controller keeps a checkpoint's batch count only if the checkpoint's trial id is
        # its own (0 off-cluster): a cluster trial's checkpoint (a diverged trial resumed here
        # with a lower learning rate) would restart the count at 0 while the data and the
        # schedules go on from the checkpoint's step.
        controller.trial_id = checkpoint.trial_id(resume)
    controller.run()


def resumed_config(
    args: argparse.Namespace, resume: Optional[str]
) -> Tuple[Dict[str, Any], List[str]]:
    """The run's config: the yaml (or, resuming without one, the checkpoint's own config) with
    the --set values, data paths absolute; and, resuming, what it changes in the checkpoint's
    config that alters the result (refused unless --allow-config-change)."""
    stored = checkpoint.stored_config(resume) if resume else None
    if args.config is not None:
        config = load_config(args.config, args.overrides)
    else:
        config = copy.deepcopy(stored)
        for override in args.overrides:
            apply_override(config, override)
    absolute_data_paths(config)
    if stored is None:
        return config, []
    absolute_data_paths(stored)
    changes = result_changes(stored, config)
    if changes and not args.allow_config_change:
        raise ConfigError(
            f"--resume {resume}: the config differs from the checkpoint's in what it computes: "
            f"{'; '.join(changes)}. Resume without those changes, or pass --allow-config-change"
        )
    return config, changes


def run_locally(args: argparse.Namespace) -> None:
    resume = checkpoint.check(args.resume) if args.resume else None
    config, changes = resumed_config(args, resume)
    distributed = None
    slots = 1
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        os.environ.setdefault("USE_TORCH_DISTRIBUTED", "1")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        distributed = core.DistributedContext.from_torch_distributed()
        slots = distributed.size
    # Validate everything a user wrote before any data is downloaded or model built.
    experiment = parse_experiment_config(config, slots)
    if experiment.run.profiling:
        logger.warning("profiling.enabled: Determined's profiler runs on a cluster only; ignored")
    checkpoint_dir = utils.writable_directory(args.checkpoint_dir, "--checkpoint-dir")
    # Determined's local checkpoint storage lives under $XDG_DATA_HOME/determined.
    os.makedirs(os.path.join(checkpoint_dir, "determined"), exist_ok=True)
    os.environ["XDG_DATA_HOME"] = checkpoint_dir
    # One TensorBoard folder per run (a resumed run continues its own), so that runs sharing
    # a --checkpoint-dir are told apart by TensorBoard and by the curves of a checkpoint.
    run = (checkpoint.tensorboard_run(resume) if resume else None) or new_run_name()
    if distributed is not None:
        run = distributed.broadcast(run)  # the chief's name
    tensorboard_dir = checkpoint.tensorboard_folder(checkpoint_dir, run)
    torch.manual_seed(experiment.run.seed)
    np.random.seed(experiment.run.seed)

    with pytorch.init(
        hparams=config["hyperparameters"], exp_conf=config, distributed=distributed
    ) as context:
        # Determined 0.38.1's local pytorch.init takes no TensorBoard path and its writer would
        # default to ./runs of whatever directory the command runs in: keep it beside the
        # checkpoints (the local train context reads this attribute when it makes the writer).
        context._core.train._tbd_directory = pathlib.Path(tensorboard_dir)
        trial = BYOLTrial(context, experiment, tensorboard_run=run)
        lengths = training_lengths(trial)
        if context.distributed.rank == 0:
            if changes:
                logger.warning(
                    "resuming with a changed config (%s): the LR and EMA schedules now span %d "
                    "steps (%d epochs)",
                    "; ".join(changes),
                    trial.total_steps,
                    trial.hp.epochs,
                )
            logger.info(
                "training %d steps (%d epochs x %d batches of %d); checkpoints under %s; "
                "TensorBoard: tensorboard --logdir %s",
                trial.total_steps,
                trial.hp.epochs,
                trial.batches_per_epoch,
                trial.hp.global_batch_size,
                os.path.join(checkpoint_dir, "determined"),
                tensorboard_dir,
            )
        fit_locally(trial, context, lengths, resume)
    if args.plot and (distributed is None or distributed.rank == 0):
        import pictures  # matplotlib: only when asked

        pictures.draw_tensorboard_curves(tensorboard_dir)
    if distributed is not None:
        dist.destroy_process_group()


def new_run_name() -> str:
    """A local run's name: when it started, and a random suffix for runs started together."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


if __name__ == "__main__":
    # Run through the importable module, so checkpoints name the trial `model_def:BYOLTrial`
    # (not `__main__:BYOLTrial`) and load anywhere.
    import model_def

    model_def.main()
