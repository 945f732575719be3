"""Where a fine-tuned backbone comes from (hyperparameters.pretrained of finetune.py's config):

    checkpoint       a BYOL checkpoint directory on this machine
    checkpoint_uuid  a BYOL checkpoint in the cluster's checkpoint storage (cluster only)
    experiment_id    a BYOL experiment's best checkpoint by its searcher metric (cluster only),
                     found through the SDK as `evaluate_result.py --experiment-id` finds it
    export           a file written by `evaluate_result.py --export` (its .json sidecar beside)
    (none)           random initialisation: the baseline that shows what pretraining bought

Each gives the backbone's weights and what it was trained as (architecture, stem, image size,
normalisation), and a record of where they came from, which the fine-tuning run logs and keeps
in every checkpoint.
"""

import json
import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

import backbone
import checkpoint
from config import ConfigError, FineTuneHParams, PretrainedSource, check_input_size
from export import sidecar_path


class Pretrained(NamedTuple):
    backbone_name: str
    cifar_stem: bool
    image_size: Optional[int]  # what it was trained at; None: random initialisation
    normalization: Optional[Tuple[List[float], List[float]]]  # None: the dataset's own
    state: Optional[Dict[str, torch.Tensor]]  # torchvision keys, no fc; None: random init
    record: Dict[str, Any]  # where the weights came from, as the run records it


def from_checkpoint(ckpt: checkpoint.Checkpoint, record: Dict[str, Any]) -> Pretrained:
    hp = checkpoint.hparams_of(ckpt)
    record = dict(record, checkpoint_uuid=ckpt.uuid, steps_completed=ckpt.steps_completed)
    return Pretrained(
        hp.backbone_name,
        hp.cifar_stem,
        hp.augmentation.image_size,
        checkpoint.normalization(ckpt),
        ckpt.backbone_state,
        record,
    )


def from_export(path: str) -> Pretrained:
    """An exported backbone: its weights file and the description beside it (export.py)."""
    path = os.path.abspath(os.path.expanduser(path))
    sidecar = sidecar_path(path)
    if not os.path.isfile(path) or not os.path.isfile(sidecar):
        raise ConfigError(
            f"hyperparameters.pretrained.export={path!r}: expected the weights file and its "
            f"description {sidecar!r}, as evaluate_result.py --export writes them"
        )
    with open(sidecar) as f:
        info = json.load(f)
    state = torch.load(path, map_location="cpu", weights_only=True)
    norm = info["normalization"]
    record = {"export": path, "checkpoint_uuid": info.get("checkpoint_uuid")}
    return Pretrained(
        info["architecture"],
        bool(info["cifar_stem"]),
        int(info["image_size"]),
        (list(norm["mean"]), list(norm["std"])),
        state,
        dict(record, steps_completed=info.get("steps_completed")),
    )


def best_checkpoint_uuid(core_context, experiment_id: int) -> Tuple[str, Dict[str, Any]]:
    """The experiment's best checkpoint (its uuid, and the searcher metric that made it best),
    asked of the master with the trial's own session."""
    from determined.experimental import client

    from cluster_eval import ClusterError, best_checkpoint

    session = core_context._session
    try:
        best = best_checkpoint(
            client.Determined._from_session(session), experiment_id, session.master
        )
    except ClusterError as e:
        raise ConfigError(
            f"hyperparameters.pretrained.experiment_id={experiment_id}: {e}"
        ) from None
    metric = best.training.experiment_config["searcher"]["metric"]
    value = (best.training.validation_metrics.get("avgMetrics") or {}).get(metric)
    return best.uuid, {metric: value}


def from_cluster(core_context, uuid: str, record: Dict[str, Any]) -> Pretrained:
    """A checkpoint of the cluster's checkpoint storage, downloaded (or mounted) for reading."""
    with core_context.checkpoint.restore_path(uuid) as path:
        ckpt = checkpoint.read(str(path))
    return from_checkpoint(ckpt._replace(uuid=uuid), record)


def resolve(source: PretrainedSource, core_context=None, share=None) -> Optional[Pretrained]:
    """The pretrained backbone `source` names; None for random initialisation. On a cluster
    `core_context` is the trial's (for checkpoint storage and the master), `share(fn)` runs fn
    on the chief and hands every process its result (startup.Startup.share)."""
    kind = source.kind
    if kind == "random":
        return None
    if kind == "checkpoint":
        path = source.checkpoint
        return from_checkpoint(checkpoint.read(path), {"checkpoint": os.path.abspath(path)})
    if kind == "export":
        return from_export(source.export)
    if core_context is None or getattr(core_context, "_session", None) is None:
        raise ConfigError(
            f"hyperparameters.pretrained.{kind} names a checkpoint of a cluster: it works on "
            f"the cluster (det experiment create); here, download it (det checkpoint download "
            f"UUID) and set hyperparameters.pretrained.checkpoint to its directory"
        )
    if kind == "checkpoint_uuid":
        return from_cluster(core_context, source.checkpoint_uuid, {})
    uuid, metric = (share or (lambda fn: fn()))(
        lambda: best_checkpoint_uuid(core_context, source.experiment_id)
    )
    record = {"experiment_id": source.experiment_id, "best_by": metric}
    return from_cluster(core_context, uuid, record)


def architecture(hp: FineTuneHParams, pretrained: Optional[Pretrained]) -> Tuple[str, bool, int]:
    """(backbone_name, cifar_stem, image_size) of the run: the pretrained backbone's own, where
    the config leaves them unset; a backbone_name or stem that differs from the pretrained
    weights' cannot load them and is refused. The image size may differ (transfer)."""
    if pretrained is None:
        if hp.image_size is None:
            raise ConfigError(
                "hyperparameters.image_size is required without a pretrained backbone (random "
                "initialisation), e.g. 32 for CIFAR-10"
            )
        return _checked(hp.backbone_name, bool(hp.cifar_stem), hp.image_size)
    for key, ours, theirs in (
        ("backbone_name", hp.backbone_name, pretrained.backbone_name),
        ("cifar_stem", hp.cifar_stem, pretrained.cifar_stem),
    ):
        if ours is not None and ours != theirs:
            shown = str(theirs).lower() if isinstance(theirs, bool) else theirs
            raise ConfigError(
                f"hyperparameters.{key}={ours!r} does not fit the pretrained backbone, which is "
                f"{key}={shown}: its weights cannot load; leave {key} unset (null) to follow it"
            )
    size = hp.image_size or pretrained.image_size
    if size != pretrained.image_size and backbone.family_of(pretrained.backbone_name).name == "ViT":
        raise ConfigError(
            f"hyperparameters.image_size={size} does not fit the pretrained ViT, trained at "
            f"{pretrained.image_size} px: its position embeddings are per patch; leave "
            f"image_size unset (null) to follow it"
        )
    return _checked(pretrained.backbone_name, pretrained.cifar_stem, size)


def _checked(name: str, cifar_stem: bool, image_size: int) -> Tuple[str, bool, int]:
    check_input_size(name, cifar_stem, image_size)
    return name, cifar_stem, image_size
