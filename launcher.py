"""The command line of a trial of this package (BYOL pretraining in model_def.py, fine-tuning in
finetune.py): local training through Determined's Trainer, resuming, `--check`, and the
cluster's entrypoint. Each trial module names what differs in a `TrialKind`; everything else,
and every rule about runs, checkpoints and resuming, is here once.
"""

import abc
import argparse
import copy
import dataclasses
import importlib
import json
import logging
import os
import pathlib
import sys
import time
import uuid
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import determined as det
import numpy as np
import torch
import torch.distributed as dist
from determined import core, pytorch

import checkpoint
import data
import device
import optim
import utils
from config import (
    ConfigError,
    Length,
    absolute_data_paths,
    add_set_option,
    apply_override,
    load_config,
    result_changes,
)
from memory import parse_gpu_memory
from nonfinite import TrialDiverged
from progress import Progress
from searcher_stop import SearcherStop
from startup import Startup, StartupFailed

logger = logging.getLogger("byol")


Batch = Dict[str, torch.Tensor]  # a batch as the trials' loaders give it


class Trial(pytorch.PyTorchTrial):
    """What every trial of this package keeps of its context and typed config; then its own
    build steps (`build`: data, network, optimizer, metrics).

    `trial_id`: the trial's id on a cluster (where its searcher may stop it); None locally.
    `startup`: the processes' agreed start-up (startup.py), shared with the config's parsing.
    `tensorboard_run`: a local run's name (its TensorBoard folder), kept in its checkpoints."""

    def __init__(
        self,
        context: pytorch.PyTorchTrialContext,
        config: Any,
        trial_id: Optional[int] = None,
        startup: Optional[Startup] = None,
        tensorboard_run: Optional[str] = None,
    ) -> None:
        self.context, self.trial_id, self.tensorboard_run = context, trial_id, tensorboard_run
        self.hp, self.data_config, self.run = config.hparams, config.data, config.run
        self.slots = context.distributed.get_size()
        self.device = context.device
        # Batches are copied by to_device(), asynchronously from pinned memory; Determined's
        # automatic copy would block.
        context.experimental.disable_auto_to_device()
        # Every process opens its data (and checks what else can fail there) before the first
        # collective of training; if any failed, all stop with the same line.
        self.startup = startup or Startup(context.distributed)
        # On a cluster the searcher may stop the trial after a validation (searcher_stop.py).
        self.on_cluster = trial_id is not None
        self.searcher_stop = SearcherStop(context._core, trial_id)
        self.build()

    @abc.abstractmethod
    def build(self) -> None:
        """The trial's own build steps, after the above."""

    @abc.abstractmethod
    def description(self) -> Dict[str, Any]:
        """What each checkpoint's marker records of the network (checkpoint.MARKER)."""

    def checkpoint_files(self) -> Dict[str, str]:
        """Files (name -> text) each checkpoint gets besides Determined's and the marker."""
        return {}

    def build_sampler(self, images: int, order=None) -> None:
        """The epoch sampler over `images` training images (data.EpochBatchSampler; `order`
        its epoch order, None a permutation) and what follows from it: the schedules' lengths
        in steps, the corrupt-image log and the loader workers."""
        self.train_sampler = data.EpochBatchSampler(
            images, self.hp.global_batch_size, self.slots, self.run.seed, order=order
        )
        self.batches_per_epoch = self.train_sampler.batches_per_epoch
        self.total_steps = self.hp.epochs * self.batches_per_epoch
        self.warmup_steps = int(round(self.hp.warmup_epochs * self.batches_per_epoch))
        self.corrupt_log = data.CorruptImageLog(self.data_config.strict_images)
        self.num_workers = data.loader_workers(
            self.data_config.num_workers, announce=self.context.distributed.rank == 0
        )

    def build_progress(self, before_line: Callable[[], None] = lambda: None) -> Progress:
        """The chief's progress lines (progress.py); `before_line` runs before each."""
        is_chief = self.context.distributed.rank == 0
        return Progress(
            self.total_steps,
            self.batches_per_epoch,
            self.hp.global_batch_size,
            is_chief,
            before_line=before_line,
        )

    def get_batch_length(self, batch: Dict[str, torch.Tensor]) -> int:
        """A labeled batch's images, or a BYOL training batch's (each has a random key)."""
        return len(batch["label"] if "label" in batch else batch["key"])

    def learning_rate_at(self, step: int) -> float:
        """The LR of `step`: linear warmup, then half a cosine (optim.learning_rate_at)."""
        return optim.learning_rate_at(
            step, self.total_steps, self.warmup_steps, self.hp.peak_learning_rate
        )

    def set_learning_rate(self, step: int) -> float:
        """Sets the LR of `step` in every parameter group (times the group's lr_scale, if it
        has one) and returns it."""
        lr = self.learning_rate_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def network_record(
        self, backbone_name: str, cifar_stem: bool, image_size: int, normalization
    ) -> Dict[str, Any]:
        """What every checkpoint's marker says of the network and the run, for loading it
        without the config (the trial's description adds its own)."""
        mean, std = normalization
        return {
            "backbone_name": backbone_name,
            "cifar_stem": cifar_stem,
            "image_size": image_size,
            "dataset_name": self.hp.dataset_name,
            "normalization": {"mean": list(mean), "std": list(std)},
            "slots": self.slots,
            **({"tensorboard_run": self.tensorboard_run} if self.tensorboard_run else {}),
        }

    def to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The batch on the device, but for the JPEG bytes decoded from host memory."""
        return {
            name: t if name in data.HOST_ONLY else t.to(self.device, non_blocking=True)
            for name, t in batch.items()
        }

    def batch_loader(self, dataset, batches) -> pytorch.DataLoader:
        """A loader of `dataset` in `batches` (a sampler or a list of index batches), with the
        trial's loader workers, pinned for its device (device.batch_loader)."""
        return device.batch_loader(
            dataset, batches, self.num_workers, self.device, pytorch.DataLoader
        )

    def labeled_images_loader(self, parts, size: int) -> pytorch.DataLoader:
        """Validation's loader of centre crops of labeled images (data.EvalImages of `parts`,
        [(source, split id)]), Determined sharding them over the slots; the trial's
        per-slot batch, num_workers and corrupt_log."""
        return pytorch.DataLoader(
            data.EvalImages(parts, size, self.corrupt_log),
            batch_size=self.train_sampler.per_slot_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,  # they keep the crops
        )


class TrialKind(NamedTuple):
    """What a trial's command needs to know of the trial."""

    trial_spec: str  # "module:Class", as Determined records it in each checkpoint
    # (raw experiment config, slots) -> the typed config; raises ConfigError
    parse: Callable[[Dict[str, Any], int], Any]
    # (context, typed config, trial_id or None, startup or None, tensorboard_run or None)
    build: Callable[..., pytorch.PyTorchTrial]
    # (config path, --set overrides, GPU bytes or None) -> exit status of `--check`
    check: Callable[[str, List[str], Optional[int]], int]
    usage: str  # the trial module's docstring
    example: str  # the command with a shipped config, e.g. "python model_def.py const-cifar10.yaml"
    default_checkpoint_dir: str
    example_set: str  # an example of --set
    schedules: str  # what a changed length re-spans, e.g. "the LR and EMA schedules"
    parse_local: Optional[Callable[[Dict[str, Any], int], Any]] = None  # a local run's; None: parse


def parse_args(kind: TrialKind, argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=kind.usage, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "config", nargs="?", help="experiment config yaml (not needed on a cluster)"
    )
    add_set_option(parser, kind.example_set)
    parser.add_argument(
        "--checkpoint-dir",
        default=kind.default_checkpoint_dir,
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
        "--gpu-memory",
        metavar="SIZE",
        help="with --check: warn where a training step is expected not to fit a GPU of SIZE "
        "(e.g. 80GB), naming the largest per-GPU batch that fits",
    )
    parser.add_argument(
        "--plot",
        action="store_true",
        help="at the end, draw the run's curves.png beside its TensorBoard files",
    )
    return parser.parse_args(argv)


def main(kind: TrialKind, argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    info = None
    try:
        info = det.get_cluster_info()
    except Exception:
        pass
    if info is not None and info.task_type == "TRIAL":
        run_on_cluster(kind, info)
        return
    args = parse_args(kind, argv)
    if args.check:
        if args.config is None or args.resume is not None:
            sys.exit("error: --check takes an experiment config yaml (and --set), not --resume")
        try:
            gpu_memory = None if args.gpu_memory is None else parse_gpu_memory(args.gpu_memory)
        except ValueError as e:
            sys.exit(f"error: {e}")
        sys.exit(kind.check(args.config, args.overrides, gpu_memory))
    if args.gpu_memory is not None:
        sys.exit("error: --gpu-memory goes with --check")
    if args.config is None and args.resume is None:
        sys.exit(f"error: give an experiment config yaml, e.g. {kind.example}")
    try:
        run_locally(kind, args)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except data.CorruptImageError as e:  # data.strict_images: true
        sys.exit(f"error: {e.one_line} (data.strict_images is true: fix or remove the image)")


def training_lengths(trial) -> Dict[str, Any]:
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


def run_on_cluster(kind: TrialKind, info) -> None:
    """The trial as the master started it: resolved hyperparameters from `info.trial.hparams`
    (the expanded config holds them in the master's {type: const, val: ...} form), the rest
    of the experiment config as the user wrote it, and the trial's own seed.

    A diverged trial (divergence.Divergence.stop) reports its worst validation and exits 0 on
    every process, which ends it COMPLETED, not restarted (nonfinite.py says why not
    det.InvalidHP).

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
            config = startup.step(lambda: kind.parse(raw, context.distributed.get_size()))
            config = dataclasses.replace(
                config, run=dataclasses.replace(config.run, seed=info.trial.trial_seed)
            )
            trial = kind.build(context, config, info.trial.trial_id, startup, None)
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
                # Logged and reported on the way (divergence.Divergence.stop). Leaving
                # pytorch.init's context normally flushes the report; every process exits 0.
                return
        except ConfigError as e:
            # StartupFailed (a ConfigError) reaches every process; a plain ConfigError (a lone
            # process, or raised after start-up) is the chief's to log.
            if isinstance(e, StartupFailed) or context.distributed.rank == 0:
                logger.error("invalid config: %s", e)
            # core.Context.__exit__ reports EarlyExitReason.INVALID_HP and exits with 0.
            raise det.InvalidHP(str(e)) from None


def fit_locally(trial, context, lengths: Dict[str, Any], resume: Optional[str]) -> None:
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


def run_locally(kind: TrialKind, args: argparse.Namespace) -> None:
    resume = checkpoint.check(args.resume, kind.trial_spec) if args.resume else None
    config, changes = resumed_config(args, resume)
    distributed = None
    slots = 1
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        os.environ.setdefault("USE_TORCH_DISTRIBUTED", "1")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        distributed = core.DistributedContext.from_torch_distributed()
        slots = distributed.size
    # Validate everything a user wrote before any data is downloaded or model built.
    experiment = (kind.parse_local or kind.parse)(config, slots)
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
        trial = kind.build(context, experiment, None, None, run)
        lengths = training_lengths(trial)
        if context.distributed.rank == 0:
            if changes:
                logger.warning(
                    "resuming with a changed config (%s): %s now span %d steps (%d epochs)",
                    "; ".join(changes),
                    kind.schedules,
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
        import curves  # matplotlib: only when asked

        curves.draw_tensorboard_curves(tensorboard_dir)
    if distributed is not None:
        dist.destroy_process_group()


def run_as_main(module: str) -> None:
    """`python MODULE.py ...`: runs MODULE's main through the importable module, so checkpoints
    name the trial `MODULE:Class` (not `__main__:Class`) and load anywhere."""
    importlib.import_module(module).main()


def new_run_name() -> str:
    """A local run's name: when it started, and a random suffix for runs started together."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
