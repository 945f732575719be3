"""What makes a directory a complete BYOL checkpoint, and what loading one needs.

A checkpoint is Determined's (state_dict.pth, load_data.json, metadata.json, code/) plus
byol_checkpoint.json, written last and atomically: a directory without it was cut off mid-save.
Both the trial (which writes checkpoints and resumes from them) and evaluate_result.py (which
reads them) use this module, so neither imports the other.
"""

import json
import os
from typing import Any, Dict

import numpy as np
import torch

import utils

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


def write_marker(checkpoint_dir: str, description: Dict[str, Any]) -> None:
    """The last file of a checkpoint: what the network is, for loading it without the config."""
    with utils.atomic_write(os.path.join(checkpoint_dir, MARKER)) as f:
        json.dump(dict(description, trial=TRIAL_SPEC), f, indent=2)


def stored_config(path: str) -> Dict[str, Any]:
    """The experiment config a checkpoint was trained with (Determined's load_data.json), with
    the trial's own hyperparameter values where it has them (a cluster config may hold search
    spaces there). A new dict on every call: callers may change it."""
    if not os.path.isfile(os.path.join(path, "load_data.json")):
        raise utils.ConfigError(
            f"checkpoint {path!r} has no load_data.json: its experiment config is unknown"
        )
    with open(os.path.join(path, "load_data.json")) as f:
        load_data = json.load(f)
    config = dict(load_data.get("experiment_config") or {})
    if isinstance(load_data.get("hparams"), dict):
        config["hyperparameters"] = load_data["hparams"]
    return config


def check(path: str) -> str:
    """Refuse anything but a complete checkpoint of this trial, before any work starts; returns
    the absolute path."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise utils.ConfigError(f"checkpoint {path!r} does not exist or is not a directory")
    load_data = os.path.join(path, "load_data.json")
    if not any(
        os.path.exists(os.path.join(path, f)) for f in ("load_data.json", "state_dict.pth", MARKER)
    ):
        raise utils.ConfigError(
            f"{path!r} is not a Determined checkpoint (no state_dict.pth, load_data.json or {MARKER})"
        )
    if os.path.isfile(load_data):
        with open(load_data) as f:
            spec = json.load(f).get("trial_cls_spec")
        if spec != TRIAL_SPEC:
            raise utils.ConfigError(f"checkpoint {path!r} belongs to {spec!r}, not {TRIAL_SPEC}")
    if not all(os.path.isfile(os.path.join(path, f)) for f in (MARKER, "metadata.json")):
        raise utils.ConfigError(
            f"checkpoint {path!r} is incomplete (no {MARKER}: the save was cut off); "
            f"use an earlier checkpoint"
        )
    return path
