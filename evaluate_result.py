#!/usr/bin/env python3
"""Linear evaluation of a trained BYOL backbone, and export of that backbone.

Local (a checkpoint directory on this machine):
    python evaluate_result.py --checkpoint CKPT_DIR --classifier-train-epochs 80
        [--no-augment] [--set DOTTED.PATH=VALUE ...] [--classifier-lrs 0.1 0.3 1]
        [--output results.json] [--export backbone.pt [--export-only]] [--pictures DIR]
        [--batch-size N] [--device cpu|cuda]

Cluster (the best checkpoint of a finished experiment, evaluated as a new experiment):
    python evaluate_result.py --experiment-id 17 --classifier-train-epochs 80 [--master URL]
        [--pictures DIR]

The protocol is linear_eval.py's (the paper's linear evaluation); reading checkpoints is
checkpoint.py's, the export export.py's, submitting to a cluster cluster_eval.py's, the
pictures pictures.py's and the curves curves.py's.
"""

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional

import checkpoint
import curves
import pictures
import utils
from cluster_eval import ClusterError, launch_cluster_evaluation, master_errors
from config import ConfigError, add_set_option
from export import export_backbone, sidecar_path
from linear_eval import Evaluation, run_evaluation
from probe import flat_metrics

EVALUATION_FILE = "evaluation.json"


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def format_report(result: Dict[str, Any]) -> str:
    top5 = "test_top5_accuracy" in result
    header = (
        ["classifier LR", "held-out top-1", "test top-1"] + (["test top-5"] if top5 else []) + [""]
    )
    rows = []
    for row in result["classifiers"]:
        cells = [
            f"{row['lr']:g}",
            _percent(row["holdout_accuracy"]),
            _percent(row["test_accuracy"]),
        ]
        if top5:
            cells.append(_percent(row["test_top5_accuracy"]))
        rows.append(cells + ["<- chosen" if row["lr"] == result["chosen_lr"] else ""])
    ckpt, protocol, images = result["checkpoint"], result["protocol"], result["images"]
    epochs = protocol["classifier_train_epochs"]
    training = (
        "random-resized crop + flip" if protocol["augment"] else "cached centre-crop features"
    )
    title = (
        f"Linear evaluation of {ckpt['path']} (step {ckpt['steps_completed']}): "
        f"{epochs} epoch{'s' if epochs != 1 else ''}, {training}, "
        f"{images['fit']} fit / {images['holdout']} held-out / {images['test']} test images"
    )
    summary = (
        f"chosen LR {result['chosen_lr']:g} (held-out top-1 {_percent(result['holdout_accuracy'])}): "
        f"test top-1 {_percent(result['test_accuracy'])}"
    )
    if top5:
        summary += f", test top-5 {_percent(result['test_top5_accuracy'])}"
    summary += (
        f"; kNN (k={protocol['knn_k']}, T={protocol['knn_temperature']:g}) test top-1 "
        f"{_percent(result['knn_accuracy'])}"
    )
    return "\n".join([title, utils.format_table(rows, header), summary])


def evaluate_as_asked(
    ckpt: checkpoint.Checkpoint,
    args: argparse.Namespace,
    on_epoch: Optional[Callable[[int, int], None]] = None,
) -> Evaluation:
    """run_evaluation() with the command line's options. With --pictures, data without labels
    is not refused: its pictures are drawn without classes (the result is then None)."""
    return run_evaluation(
        ckpt,
        args.classifier_train_epochs,
        not args.no_augment,
        args.classifier_lrs,
        args.batch_size,
        args.device,
        on_epoch,
        labels_required=not args.pictures,
    )


def write_json(path: str, value: Dict[str, Any]) -> None:
    with utils.atomic_write(path) as f:
        json.dump(value, f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------------------------
# Command line: local, submitting to a cluster, and inside the cluster's evaluation task
# ------------------------------------------------------------------------------------------


def evaluate_in_cluster(
    args: argparse.Namespace, core_context, data_section: Optional[Dict[str, Any]]
) -> Optional[Dict[str, Any]]:
    """Inside the evaluation task: fetch the checkpoint from checkpoint storage, evaluate, and
    report the result as validation metrics. With --pictures, the pictures are stored as a
    checkpoint of this task, at the validation's step, for the user to download."""
    if args.pictures:
        utils.writable_directory(args.pictures, "--pictures")
    epochs_done = {"n": 0}

    def on_epoch(done: int, total: int) -> None:
        epochs_done["n"] = done
        core_context.train.report_progress(done / total)

    with core_context.checkpoint.restore_path(args.checkpoint_uuid) as path:
        ckpt = checkpoint.read(str(path), args.overrides, data_section)
        ckpt = ckpt._replace(uuid=args.checkpoint_uuid)
        evaluation = evaluate_as_asked(ckpt, args, on_epoch)
    result = evaluation.result
    steps = max(1, epochs_done["n"])
    if result is not None:
        print(format_report(result), flush=True)
        core_context.train.report_validation_metrics(
            steps_completed=steps, metrics=flat_metrics(result)
        )
        if args.output:
            write_json(args.output, result)
    if args.pictures:
        # No curves: the task has no TensorBoard files; --experiment-id drew them from the master.
        pictures.draw_evaluation(evaluation, args.pictures, with_curves=False)
        uuid = core_context.checkpoint.upload(args.pictures, metadata={"steps_completed": steps})
        print(f"pictures stored as checkpoint {uuid}: det checkpoint download {uuid}", flush=True)
    return result


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="a local checkpoint directory")
    source.add_argument(
        "--experiment-id",
        type=int,
        metavar="ID",
        help="evaluate this experiment's best checkpoint as a new cluster experiment",
    )
    source.add_argument(
        "--checkpoint-uuid",
        metavar="UUID",
        help="(inside the cluster evaluation task) the checkpoint to evaluate",
    )
    parser.add_argument(
        "--classifier-train-epochs",
        type=int,
        metavar="N",
        help="epochs of classifier training (default: hyperparameters.classifier_train_epochs)",
    )
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="train on cached centre-crop features instead of random crops + flips (fast)",
    )
    parser.add_argument(
        "--classifier-lrs",
        type=float,
        nargs="+",
        metavar="LR",
        help="learning rates of the sweep (default: hyperparameters.classifier_lrs)",
    )
    add_set_option(parser, "data.train_dir=/data/train (the checkpoint's config)")
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="classifier batch size (default: hyperparameters.classifier_batch_size)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument(
        "--output",
        metavar="FILE",
        help=f"result JSON (default: {EVALUATION_FILE} in the checkpoint)",
    )
    parser.add_argument(
        "--export",
        metavar="FILE.pt",
        help="also write the online backbone as a torchvision ResNet state dict (+ FILE.json)",
    )
    parser.add_argument(
        "--export-only", action="store_true", help="with --export: export and skip the evaluation"
    )
    parser.add_argument(
        "--pictures",
        metavar="DIR",
        help="also draw neighbours.png, confusion.png (+ per_class.csv), embedding.png and "
        "curves.png into DIR (with --experiment-id: curves.png here, the others into the "
        "evaluation's checkpoint)",
    )
    parser.add_argument("--master", metavar="URL", help="Determined master (default: $DET_MASTER)")
    args = parser.parse_args(argv)
    if args.export_only and not args.export:
        parser.error("--export-only needs --export FILE.pt")
    if args.export_only and args.pictures:
        parser.error("--pictures draws what the evaluation computes; --export-only skips it")
    if args.experiment_id is not None and (args.export or args.output):
        parser.error(
            "--export and --output work on a local --checkpoint; on a cluster the result "
            "is reported as the new experiment's validation metrics"
        )
    return args


def run_local(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    ckpt = checkpoint.read(args.checkpoint, args.overrides)
    hp = checkpoint.hparams_of(ckpt)
    output = args.output or os.path.join(ckpt.path, EVALUATION_FILE)
    # Fail before a long evaluation, not after it.
    if args.export:
        utils.writable_directory(os.path.dirname(os.path.abspath(args.export)), "--export")
    if not args.export_only:
        utils.writable_directory(os.path.dirname(os.path.abspath(output)), "--output")
    if args.pictures:
        utils.writable_directory(args.pictures, "--pictures")
    if args.export:
        export_backbone(ckpt, hp, args.export)
        print(
            f"exported the online backbone to {args.export} (description: {sidecar_path(args.export)})"
        )
    if args.export_only:
        return None
    evaluation = evaluate_as_asked(ckpt, args)
    result = evaluation.result
    if result is not None:
        write_json(output, result)
        print(format_report(result))
        print(f"wrote {output} ({result['wall_time_s']:.0f} s)")
    if args.pictures:
        pictures.draw_evaluation(evaluation, args.pictures, with_curves=True)
    return result


def run_launch(args: argparse.Namespace, sdk=None) -> None:
    from determined.common import api

    if args.classifier_train_epochs is None:
        raise ConfigError("--experiment-id needs --classifier-train-epochs N")
    if args.pictures:
        utils.writable_directory(args.pictures, "--pictures")
    master_url = api.canonicalize_master_url(args.master or api.get_default_master_url())
    if sdk is None:
        from determined.experimental import client

        # An explicit client object, not the module's one-login-per-process singleton.
        with master_errors(master_url):
            sdk = client.Determined(master=master_url)
    model_dir = os.path.dirname(
        os.path.abspath(__file__)
    )  # this package, as the training shipped it
    new, best = launch_cluster_evaluation(
        sdk,
        args.experiment_id,
        args.classifier_train_epochs,
        not args.no_augment,
        model_dir,
        master_url,
        overrides=args.overrides,
        batch_size=args.batch_size,
        lrs=args.classifier_lrs,
        pictures=bool(args.pictures),
    )
    print(f"experiment {args.experiment_id}: best checkpoint {best.uuid}")
    print(f"started evaluation experiment {new.id}: {master_url}/det/experiments/{new.id}/overview")
    print(
        f"its test_accuracy appears there as a validation metric when it finishes "
        f"(logs: det -m {master_url} experiment logs {new.id} --follow)"
    )
    if args.pictures:
        with master_errors(master_url):
            curves.draw_trial_curves(sdk, args.experiment_id, best, args.pictures)
        print(
            f"the evaluation stores neighbours.png, confusion.png, per_class.csv and "
            f"embedding.png as its checkpoint; when it finishes: "
            f"det -m {master_url} experiment download {new.id} --output-dir {args.pictures}"
        )


def run_in_cluster(args: argparse.Namespace) -> None:
    import determined as det
    from determined import core

    info = det.get_cluster_info()
    if info is None:
        raise ConfigError(
            "--checkpoint-uuid is for the evaluation task on a cluster; here, download the "
            "checkpoint (det checkpoint download UUID) and pass --checkpoint DIR"
        )
    with core.init() as core_context:
        evaluate_in_cluster(args, core_context, info.user_data or None)


def main(argv: Optional[List[str]] = None, sdk=None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    args = parse_args(argv)
    try:
        if args.checkpoint is not None:
            run_local(args)
        elif args.experiment_id is not None:
            run_launch(args, sdk)
        else:
            run_in_cluster(args)
    except (ConfigError, ClusterError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
