"""BYOL checkpoints: what makes a directory a complete one, and reading one back.

A checkpoint is Determined's (state_dict.pth, load_data.json, metadata.json, code/) plus
byol_checkpoint.json, written last and atomically: a directory without it was cut off mid-save.
The trial writes checkpoints and resumes from them; the evaluation and the export read the
online backbone out of them (`read`, `load_backbone`). Both use this module, so neither imports
the other.
"""

import copy
import json
import logging
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from determined import pytorch

import utils
from backbone import build_backbone, load_backbone_weights
from config import ConfigError, HParams, apply_override, parse_hparams

logger = logging.getLogger("byol")

MARKER = "byol_checkpoint.json"
TRIAL_SPEC = "model_def:BYOLTrial"

# Determined's checkpoint holds NumPy's RNG state. torch >= 2.4 can allow exactly those types in
# a weights_only load (torch >= 2.6 loads so by default, so no user needs
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD); taken from public NumPy API: the function arrays pickle
# with, and the class of a uint32 dtype. torch 2.3 (Determined's default image) has no such
# allowlist: there checkpoints load with weights_only=False, as Determined itself loads them.
WEIGHTS_ONLY = hasattr(torch.serialization, "add_safe_globals")
if WEIGHTS_ONLY:
    torch.serialization.add_safe_globals(
        [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(0).__reduce__()[0]]
    )


def load_state(path: str) -> Dict[str, Any]:
    """A checkpoint's state_dict.pth (Determined's: models, optimizers, RNG states) on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=WEIGHTS_ONLY)


def write_marker(
    checkpoint_dir: str, description: Dict[str, Any], trial_spec: str = TRIAL_SPEC
) -> None:
    """The last file of a checkpoint: what the network is, for loading it without the config.
    `trial_spec`: the trial that wrote it (BYOL's, or the fine-tuning trial's)."""
    with utils.atomic_write(os.path.join(checkpoint_dir, MARKER)) as f:
        json.dump(dict(description, trial=trial_spec), f, indent=2)


class CompleteCheckpoint(pytorch.PyTorchCallback):
    """Completes each checkpoint a trial writes: the trial's own files (trial.checkpoint_files),
    then MARKER with trial.description(), written last. `trial_spec`: the trial's, as
    Determined records it."""

    def __init__(self, trial: Any, trial_spec: str):
        self.trial, self.trial_spec = trial, trial_spec

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        for name, text in self.trial.checkpoint_files().items():
            with utils.atomic_write(os.path.join(checkpoint_dir, name)) as f:
                f.write(text)
        write_marker(checkpoint_dir, self.trial.description(), self.trial_spec)
        if self.trial.context.distributed.rank == 0:
            logger.info("checkpoint written: %s", checkpoint_dir)


def stored_config(path: str) -> Dict[str, Any]:
    """The experiment config a checkpoint was trained with (Determined's load_data.json), with
    the trial's own hyperparameter values where it has them (a cluster config may hold search
    spaces there). A new dict on every call: callers may change it."""
    if not os.path.isfile(os.path.join(path, "load_data.json")):
        raise ConfigError(
            f"checkpoint {path!r} has no load_data.json: its experiment config is unknown"
        )
    with open(os.path.join(path, "load_data.json")) as f:
        load_data = json.load(f)
    config = dict(load_data.get("experiment_config") or {})
    if isinstance(load_data.get("hparams"), dict):
        config["hyperparameters"] = load_data["hparams"]
    return config


def trial_id(path: str) -> int:
    """The id of the trial that wrote the checkpoint, from Determined's trial_state.pkl (0 for a
    local run, the cluster's trial id otherwise); 0 where the file is missing."""
    import pickle

    state_file = os.path.join(path, "trial_state.pkl")
    if not os.path.isfile(state_file):
        return 0
    with open(state_file, "rb") as f:
        # Determined's own file (a dict of ints), which its controller unpickles the same way.
        return int(pickle.load(f).get("trial_id") or 0)


def _check(path: str, trial_spec: str) -> str:
    """Refuse anything but a complete checkpoint of `trial_spec`, before any work starts;
    returns the absolute path."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint {path!r} does not exist or is not a directory")
    load_data = os.path.join(path, "load_data.json")
    if not any(
        os.path.exists(os.path.join(path, f)) for f in ("load_data.json", "state_dict.pth", MARKER)
    ):
        raise ConfigError(
            f"{path!r} is not a Determined checkpoint (no state_dict.pth, load_data.json or {MARKER})"
        )
    if os.path.isfile(load_data):
        with open(load_data) as f:
            spec = json.load(f).get("trial_cls_spec")
        if spec != trial_spec:
            raise ConfigError(f"checkpoint {path!r} belongs to {spec!r}, not {trial_spec}")
    if not all(os.path.isfile(os.path.join(path, f)) for f in (MARKER, "metadata.json")):
        raise ConfigError(
            f"checkpoint {path!r} is incomplete (no {MARKER}: the save was cut off); "
            f"use an earlier checkpoint"
        )
    return path


# Wrappers whose prefix ends up in saved keys: DistributedDataParallel ("module.") in a
# multi-slot run, torch.compile's OptimizedModule ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_BACKBONE_PREFIX = "online_backbone."


def _read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _subdirs(path: str) -> List[str]:
    try:
        return [e.path for e in os.scandir(path) if e.is_dir()]
    except OSError:
        return []


def _checkpoints_below(path: str) -> List[str]:
    """Complete checkpoints one or two levels below `path` (a --checkpoint-dir or its
    determined/ folder), newest first: what a user most likely meant."""
    candidates = [d for child in _subdirs(path) for d in [child] + _subdirs(child)]
    found = [d for d in candidates if os.path.isfile(os.path.join(d, MARKER))]
    return sorted(found, key=os.path.getmtime, reverse=True)


def check(path: str, trial_spec: str = TRIAL_SPEC) -> str:
    """Refuse anything but a complete checkpoint of `trial_spec` (BYOL's trial by default),
    before any work starts, with a hint when the path holds checkpoints further down; returns
    the absolute path."""
    try:
        return _check(path, trial_spec)
    except ConfigError as error:
        full = os.path.abspath(os.path.expanduser(path))
        below = _checkpoints_below(full) if os.path.isdir(full) else []
        if below:
            raise ConfigError(
                f"{error}; it holds checkpoints, e.g. the newest: {below[0]}"
            ) from None
        raise


# ------------------------------------------------------------------------------------------
# Reading a checkpoint: its config, hyperparameters and online backbone
# ------------------------------------------------------------------------------------------


class Checkpoint(NamedTuple):
    path: str
    uuid: str
    steps_completed: Optional[int]
    config: Dict[str, Any]  # the experiment config, hyperparameters = the trial's own values
    marker: Dict[str, Any]  # byol_checkpoint.json
    backbone_state: Dict[str, torch.Tensor]  # online backbone, torchvision resnet keys, no fc


def online_backbone_state(
    model_state: Dict[str, torch.Tensor], where: str
) -> Dict[str, torch.Tensor]:
    """The online backbone's weights out of the BYOL network's state dict, with torchvision's
    resnet key names (conv1.weight, layer1.0.bn1.running_mean, ...). Copies are made so an
    export does not serialise storage shared with the rest of the checkpoint."""
    out = {}
    for key, value in model_state.items():
        while key.startswith(_WRAPPER_PREFIXES):  # each prefix is one dotted component
            key = key.split(".", 1)[1]
        if key.startswith(_BACKBONE_PREFIX):
            out[key[len(_BACKBONE_PREFIX) :]] = value.detach().clone().contiguous()
    if not out:
        raise ConfigError(f"{where} holds no {_BACKBONE_PREFIX}* weights: not a BYOL network")
    return out


def read(
    path: str, overrides: Sequence[str] = (), data_section: Optional[Dict[str, Any]] = None
) -> Checkpoint:
    """Validate and read a checkpoint directory. The experiment config is the one it was
    trained with (stored_config); `data_section` replaces its data section (the evaluation
    task's own, on a cluster); `overrides` (--set) are applied last."""
    path = check(path)
    config = stored_config(path)
    if data_section is not None:
        config["data"] = copy.deepcopy(data_section)
    for override in overrides:
        apply_override(config, override)
    marker = _read_json(os.path.join(path, MARKER))
    steps = _read_json(os.path.join(path, "metadata.json")).get("steps_completed")

    weights = os.path.join(path, "state_dict.pth")
    if not os.path.isfile(weights):
        raise ConfigError(
            f"checkpoint {path!r} has no state_dict.pth (not a PyTorchTrial checkpoint)"
        )
    state = load_state(weights)
    try:
        model_state = state["models_state_dict"][0]
    except (KeyError, IndexError, TypeError):
        raise ConfigError(
            f"{weights!r} holds no models_state_dict: not a PyTorchTrial checkpoint"
        ) from None
    return Checkpoint(
        path=path,
        uuid=os.path.basename(path),
        steps_completed=steps,
        config=config,
        marker=marker,
        backbone_state=online_backbone_state(model_state, weights),
    )


def hparams_of(ckpt: Checkpoint) -> HParams:
    """The hyperparameters the checkpoint was trained with, typed."""
    return parse_hparams(ckpt.config.get("hyperparameters", {}), 1)


def load_backbone(ckpt: Checkpoint, hp: HParams) -> Tuple[torch.nn.Module, int]:
    """The online backbone with the checkpoint's weights, frozen, in eval mode."""
    # No pretrained_weights: the checkpoint's weights replace them, and the file need not
    # exist on this machine.
    backbone, feature_dim = build_backbone(
        hp.backbone_name, hp.cifar_stem, hp.augmentation.image_size
    )
    try:
        load_backbone_weights(
            backbone, ckpt.backbone_state, hp.backbone_name, hp.cifar_stem, "the checkpoint"
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return backbone.eval().requires_grad_(False), feature_dim


def tensorboard_folder(checkpoint_dir: str, run: str) -> str:
    """A local run's TensorBoard folder: one per run under the --checkpoint-dir, whose
    checkpoints are under determined/ beside it."""
    return os.path.join(checkpoint_dir, "tensorboard", run)


def tensorboard_run(path: str) -> Optional[str]:
    """The local run a checkpoint directory belongs to (its TensorBoard folder's name), as its
    marker records it; None for a checkpoint of a cluster or of an older version."""
    return _read_json(os.path.join(path, MARKER)).get("tensorboard_run")


def run_tensorboard_folder(ckpt: Checkpoint) -> Optional[str]:
    """Where the TensorBoard files of the checkpoint's run are, if it was a local run: beside
    the determined/ folder that holds the checkpoint."""
    run = ckpt.marker.get("tensorboard_run")
    return tensorboard_folder(os.path.dirname(os.path.dirname(ckpt.path)), run) if run else None


def normalization(ckpt: Checkpoint) -> Tuple[List[float], List[float]]:
    """The normalisation the backbone was trained with (recorded in byol_checkpoint.json)."""
    norm = ckpt.marker["normalization"]
    return list(norm["mean"]), list(norm["std"])
