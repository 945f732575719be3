"""Submitting an evaluation to a Determined cluster: the best checkpoint of a finished experiment,
evaluated by evaluate_result.py as a new one-slot experiment whose validation metrics are the
result. The master is reached through the SDK; its errors become one line that says what to do."""

import contextlib
import copy
from typing import Any, Dict, Optional, Sequence

EVAL_NAME_SUFFIX = "-linear-eval"
# The evaluation task draws its pictures here (in its working directory), then stores them as
# a checkpoint of the evaluation trial.
PICTURES_IN_TASK = "pictures"


class ClusterError(RuntimeError):
    """A Determined master call failed in a way the user can fix; the message says how."""


def evaluation_experiment_config(
    original_config: Dict[str, Any],
    checkpoint_uuid: str,
    classifier_epochs: int,
    augment: bool,
    hparams: Optional[Dict[str, Any]] = None,
    overrides: Sequence[str] = (),
    batch_size: Optional[int] = None,
    lrs: Optional[Sequence[float]] = None,
    pictures: bool = False,
) -> Dict[str, Any]:
    """The experiment config of a cluster evaluation of `checkpoint_uuid`: the training
    experiment's config (same environment, data, checkpoint storage, workspace) with one slot,
    a single-trial searcher on holdout_accuracy (nothing is chosen by test accuracy), the trial's own hyperparameter values instead
    of any search space, and evaluate_result.py as the entrypoint. Pure: no master involved."""
    config = copy.deepcopy(original_config)
    config["name"] = f"{config.get('name') or 'byol'}{EVAL_NAME_SUFFIX}"
    config["description"] = f"BYOL linear evaluation of checkpoint {checkpoint_uuid}"
    entrypoint = [
        "python3",
        "evaluate_result.py",
        "--checkpoint-uuid",
        checkpoint_uuid,
        "--classifier-train-epochs",
        str(int(classifier_epochs)),
    ]
    if not augment:
        entrypoint.append("--no-augment")
    if batch_size is not None:
        entrypoint += ["--batch-size", str(int(batch_size))]
    if lrs:
        entrypoint += ["--classifier-lrs", *(f"{float(lr):g}" for lr in lrs)]
    if pictures:
        entrypoint += ["--pictures", PICTURES_IN_TASK]
    for override in overrides:
        entrypoint += ["--set", override]
    config["entrypoint"] = entrypoint  # a list: no shell, so values need no quoting
    config["resources"] = dict(config.get("resources") or {}, slots_per_trial=1)
    config["searcher"] = {
        "name": "single",
        "metric": "holdout_accuracy",
        "smaller_is_better": False,
    }
    if hparams is not None:
        config["hyperparameters"] = copy.deepcopy(hparams)
    # The task writes no checkpoints and reports one validation; training periods are moot.
    for key in ("min_validation_period", "min_checkpoint_period"):
        config.pop(key, None)
    return config


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@contextlib.contextmanager
def master_errors(master_url: str, experiment_id: Optional[int] = None):
    """The SDK's exceptions as one-line messages that say what to do. `experiment_id`: the
    experiment the calls inside look up, so that "not found" can name it."""
    from determined.common.api import errors

    try:
        yield
    except errors.NotFoundException as e:
        if experiment_id is None:
            raise ClusterError(
                f"the master at {master_url} answered 'not found': {_one_line(e)}"
            ) from None
        raise ClusterError(
            f"experiment {experiment_id} was not found on the master at {master_url} "
            f"(check the id with `det -m {master_url} experiment list`)"
        ) from None
    except errors.MasterNotFoundException:
        raise ClusterError(
            f"cannot reach a Determined master at {master_url}; set DET_MASTER or pass --master URL"
        ) from None
    except errors.UnauthenticatedException:
        raise ClusterError(
            f"not logged in to {master_url}; run `det -m {master_url} user login`"
        ) from None
    except errors.ForbiddenException as e:
        raise ClusterError(f"the master at {master_url} refused: {_one_line(e)}") from None


def best_checkpoint(sdk, experiment_id: int, master_url: str):
    """The experiment's best checkpoint by its own searcher metric (a BYOL experiment's:
    holdout_accuracy, or validation_loss without labels), with its trial's training metadata.
    `sdk`: a determined.experimental.client.Determined (or anything with its get_experiment)."""
    with master_errors(master_url, experiment_id):
        experiment = sdk.get_experiment(experiment_id)
        # Best first by the experiment's searcher metric (top_checkpoint() is deprecated in 0.38).
        checkpoints = experiment.list_checkpoints(max_results=1)
    if not checkpoints:
        raise ClusterError(
            f"experiment {experiment_id} has no completed checkpoint with a validation yet; "
            f"wait for its first validation or pass a local --checkpoint"
        )
    best = checkpoints[0]
    if best.training is None:
        raise ClusterError(
            f"checkpoint {best.uuid} of experiment {experiment_id} was not saved by a trial"
        )
    return best


def launch_cluster_evaluation(
    sdk,
    experiment_id: int,
    classifier_epochs: int,
    augment: bool,
    model_dir: str,
    master_url: str,
    overrides: Sequence[str] = (),
    batch_size: Optional[int] = None,
    lrs: Optional[Sequence[float]] = None,
    pictures: bool = False,
):
    """Find the experiment's best checkpoint and start its evaluation experiment. `sdk` is a
    determined.experimental.client.Determined (or anything with its get_experiment and
    create_experiment).
    Returns (new experiment, checkpoint)."""
    best = best_checkpoint(sdk, experiment_id, master_url)
    training = best.training
    config = evaluation_experiment_config(
        training.experiment_config,
        best.uuid,
        classifier_epochs,
        augment,
        hparams=training.hparams,
        overrides=overrides,
        batch_size=batch_size,
        lrs=lrs,
        pictures=pictures,
    )
    with master_errors(master_url):
        new = sdk.create_experiment(config, model_dir)
    return new, best
