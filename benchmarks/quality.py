"""Does BYOL learn? Pretrain on an image folder through the real training command
(model_def.py, Determined's local Trainer), then compare kNN and linear-probe test accuracy of
the BYOL backbone with the same backbone at random initialisation, in one held-out evaluation.

    python benchmarks/quality.py ../shared/data/cifar10-subset --minutes 20          # CPU budget
    python benchmarks/quality.py ../shared/data/cifar10-subset --device cuda --epochs 100

DIR holds train/<class>/<image> and test/<class>/<image>. With --minutes (CPU), the number of
epochs is chosen to fit the budget from a short timing of the training step, and the settings
differ from const-cifar10.yaml where a CPU budget of minutes needs it (printed below). With
--epochs N, const-cifar10.yaml's own recipe trains N epochs. Either way the LR and EMA
schedules span exactly the epochs trained.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import byol  # noqa: E402
import checkpoint  # noqa: E402
import data  # noqa: E402
import linear_eval  # noqa: E402
import model_def  # noqa: E402
import utils  # noqa: E402
from backbone import build_backbone  # noqa: E402
from config import HParams, load_config, parse_data_config, parse_hparams  # noqa: E402
from probe import labeled_parts, probe_metrics  # noqa: E402

SETTINGS = {
    "backbone_name": "resnet18",
    "cifar_stem": False,  # ImageNet stem: 16x fewer FLOPs on 32-px images than the CIFAR stem
    "global_batch_size": 128,
    "learning_rate": 1.0,  # base LR: peak 0.5 at batch 128 (a 4.0 base did worse in 20 minutes)
    "warmup_epochs": 2,
    "tau_base": 0.99,  # a faster-moving target suits a run of a few hundred steps
    "projector_hidden_dim": 1024,
    "weight_decay": 1e-5,
}


def overrides(folder: str, settings: dict, epochs: int, workers: int = 1) -> list:
    out = [
        "--set",
        "hyperparameters.dataset_name=image_folder",
        "--set",
        f"data.train_dir={os.path.join(folder, 'train')}",
        "--set",
        f"data.test_dir={os.path.join(folder, 'test')}",
        "--set",
        f"hyperparameters.epochs={epochs}",
        "--set",
        f"data.num_workers={workers}",
        "--set",
        f"min_validation_period={{epochs: {epochs}}}",
        "--set",
        f"min_checkpoint_period={{epochs: {epochs}}}",
        "--set",
        "scheduling_unit=20",
    ]
    for key, value in settings.items():
        out += ["--set", f"hyperparameters.{key}={json.dumps(value)}"]
    return out


def seconds_per_step(hp: HParams, image_size: int) -> float:
    """Time a few real training steps (both views, online + target, LARS, EMA) on random data."""
    backbone, dim = build_backbone(hp.backbone_name, hp.cifar_stem, hp.augmentation.image_size)
    net = byol.BYOLNetwork(backbone, dim, hp.projector_hidden_dim, hp.projection_dim)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    views = torch.randn(2 * hp.global_batch_size, 3, image_size, image_size)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        prediction, target, _ = net(views)
        opt.zero_grad()
        byol.byol_loss(prediction, target).backward()
        opt.step()
        net.update_target(0.99)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def probe(backbone, parts, hp, normalization, num_classes, device):
    """kNN and linear-probe test accuracy of a backbone's centre-crop features."""
    features_of = linear_eval.FrozenBackbone(
        backbone.eval(), hp.backbone_name, *normalization, device, None
    )
    by_split = linear_eval.extract_features(
        features_of, parts, hp.augmentation.image_size, 256, 1, data.CorruptImageLog(False)
    )
    features, labels, splits = (
        torch.cat(column)
        for column in zip(
            *((f, y, torch.full_like(y, split)) for split, (f, y, _) in by_split.items())
        )
    )
    settings = dataclasses.replace(hp.probe, epochs=100, batch_size=256)
    metrics = probe_metrics(features, labels, splits, num_classes, settings, seed=0)
    return metrics["knn_accuracy"], metrics["test_accuracy"], metrics["classifier_best_lr"]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder")
    parser.add_argument("--minutes", type=float, default=20, help="CPU mode: the time budget")
    parser.add_argument(
        "--epochs", type=int, help="epoch mode: const-cifar10.yaml's recipe for this many epochs"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--checkpoint-dir", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is available here")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the training command must not take a GPU
    device = torch.device(args.device)
    wall_start = time.time()
    folder = os.path.abspath(args.folder)
    config_path = os.path.join(ROOT, "const-cifar10.yaml")
    settings = {} if args.epochs else SETTINGS
    workers = min(8, len(os.sched_getaffinity(0))) if args.epochs else 1

    config = load_config(config_path, overrides(folder, settings, 1)[1::2])
    hp = parse_hparams(config["hyperparameters"])
    splits = data.build_splits("image_folder", parse_data_config(config["data"]))
    steps_per_epoch = len(splits.byol_train) // hp.global_batch_size
    if args.epochs:
        epochs = args.epochs
        print(
            f"images: {len(splits.byol_train)} train, {len(splits.test)} test; "
            f"{steps_per_epoch} steps/epoch; {epochs} epochs on {args.device}"
        )
    else:
        step_s = seconds_per_step(hp, hp.augmentation.image_size)
        # Leave room for start-up, the end-of-run validation and the two probes (~10%).
        train_budget = args.minutes * 60 * 0.88 - (time.time() - wall_start)
        epochs = max(1, int(train_budget / (step_s * 1.1 * steps_per_epoch)))
        print(
            f"images: {len(splits.byol_train)} train, {len(splits.test)} test; "
            f"{steps_per_epoch} steps/epoch; {step_s:.2f} s/step measured -> {epochs} epochs "
            f"for a {args.minutes:g}-minute budget"
        )
    print(
        "settings:",
        json.dumps(
            {
                "backbone_name": hp.backbone_name,
                "cifar_stem": hp.cifar_stem,
                "global_batch_size": hp.global_batch_size,
                "learning_rate": hp.learning_rate,
                "weight_decay": hp.weight_decay,
                "tau_base": hp.tau_base,
                "warmup_epochs": hp.warmup_epochs,
                "projector_hidden_dim": hp.projector_hidden_dim,
                "image_size": hp.augmentation.image_size,
                "crop_scale": hp.augmentation.crop_scale,
                "epochs": epochs,
                "optimizer": "LARS",
                "classifier_lrs": hp.probe.lrs,
            }
        ),
    )

    checkpoint_dir = args.checkpoint_dir or tempfile.mkdtemp(prefix="byol-quality-")
    train_start = time.time()
    os.chdir(ROOT)
    model_def.main(
        [
            config_path,
            "--checkpoint-dir",
            checkpoint_dir,
            *overrides(folder, settings, epochs, workers),
        ]
    )
    train_s = time.time() - train_start

    final = max(
        (
            os.path.join(checkpoint_dir, "determined", d)
            for d in os.listdir(os.path.join(checkpoint_dir, "determined"))
        ),
        key=lambda d: json.load(open(os.path.join(d, "metadata.json")))["steps_completed"],
    )
    state = torch.load(
        os.path.join(final, "state_dict.pth"), map_location="cpu", weights_only=True
    )["models_state_dict"][0]
    trained, _ = build_backbone(hp.backbone_name, hp.cifar_stem, hp.augmentation.image_size)
    trained.load_state_dict(checkpoint.online_backbone_state(state, final))
    torch.manual_seed(0)  # the same initialisation the run started from
    random_init, _ = build_backbone(hp.backbone_name, hp.cifar_stem, hp.augmentation.image_size)

    parts = labeled_parts(splits.labeled_train, splits.test, hp.probe.holdout_fraction, 0)
    num_classes = len(splits.labeled_train.classes)
    rows = []
    for name, backbone in (("random init", random_init), (f"BYOL, {epochs} epochs", trained)):
        knn, linear, lr = probe(backbone, parts, hp, splits.normalization, num_classes, device)
        rows.append([name, f"{100 * knn:.1f}%", f"{100 * linear:.1f}%", f"{lr:g}"])
    print(
        f"\ntraining took {train_s / 60:.1f} min wall; whole benchmark {(time.time() - wall_start) / 60:.1f} min; "
        f"checkpoint {final}"
    )
    print(
        utils.format_table(
            rows, ["backbone", "kNN (k=200, T=0.1)", "linear probe (100 epochs)", "chosen LR"]
        )
    )


if __name__ == "__main__":
    main()
