"""Estimated peak GPU memory of one training step, per shipped config and backbone, without a
GPU (memory.py: fake tensors, live storages counted through two steps).

    python benchmarks/step_memory.py [--names resnet18 resnet50 convnext_tiny vit_s_16 swin_t]
        [--configs const-cifar10.yaml distributed-stl10.yaml distributed-imagenet.yaml]

Each config at its per-GPU batch (global_batch_size / resources.slots_per_trial), image size,
stem and precision (as on a GPU: `precision: auto` is bf16 autocast there), with the backbone
swapped in and the optimizer its family gets. CUDA's context (about 0.5 GiB) and the caching
allocator's slack come on top.
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import device  # noqa: E402
import memory  # noqa: E402
from config import ConfigError, load_config, parse_hparams  # noqa: E402

CONFIGS = ["const-cifar10.yaml", "distributed-stl10.yaml", "distributed-imagenet.yaml"]
NAMES = ["resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "vit_s_16", "swin_t"]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--names", nargs="+", default=NAMES)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    args = parser.parse_args()
    print(f"torch {torch.__version__}")
    header = ["backbone"]
    columns = []
    for name in args.configs:
        raw = load_config(os.path.join(ROOT, name))
        slots = raw.get("resources", {}).get("slots_per_trial", 1)
        hparams = raw["hyperparameters"]
        per_gpu = hparams["global_batch_size"] // slots
        header.append(
            f"{name} ({hparams['augmentation']['image_size']} px, {per_gpu} a GPU, "
            f"cifar_stem {str(hparams['cifar_stem']).lower()})"
        )
        columns.append((raw, per_gpu))
    print("\n| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for backbone_name in args.names:
        cells = [backbone_name]
        for raw, per_gpu in columns:
            sets = {"backbone_name": backbone_name}
            if backbone_name.startswith(("vit", "swin")):
                sets["learning_rate"] = 0.0005  # AdamW's, so the config parses
            try:
                hp = parse_hparams(dict(raw["hyperparameters"], **sets), 1)
            except ConfigError as e:
                cells.append(f"refused: {str(e).split(': ')[-1]}")
                continue
            autocast = device.autocast_dtype(hp.precision, torch.device("cuda"))
            peak = memory.step_peak_bytes(hp, per_gpu, autocast)
            cells.append(f"{peak / 2**30:.1f} GiB ({hp.optimizer})")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
