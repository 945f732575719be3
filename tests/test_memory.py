"""The step-memory estimate (memory.py, fake tensors) against what a real step takes: the
resident memory a fresh process gains through two real CPU training steps, read from the
operating system (VmHWM, the process's own peak since it started; getrusage's maxrss would carry
over the forking pytest's). The estimate counts live tensors only, so the process may take somewhat
more (the allocator's slack, oneDNN's workspaces, buffers inside fused kernels): measured /
estimated must lie in [0.8, 1.6]. Measured on the development machine at batch 64, 32 px:
1.15-1.22 for ResNet-18, 1.26-1.40 for it with bf16 autocast (oneDNN's bf16 workspaces vary),
1.28-1.33 for ViT-Ti (its fused attention's own buffers), 0.97 for ConvNeXt-T. An estimate
that missed the activations, or ignored autocast, would fall outside."""

import pytest
import torch

import memory
from config import load_config, parse_hparams
from conftest import ROOT, run_python

MEASURE = """
import sys
import torch
sys.path.insert(0, {root!r})
import byol
import memory
from config import load_config, parse_hparams


def status_bytes(field):  # VmRSS: resident now; VmHWM: the most resident since exec
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


hp = parse_hparams(load_config({config!r}, {sets!r})["hyperparameters"], 1)
torch.manual_seed(0)
before = status_bytes("VmRSS")
network = byol.build_network(hp)  # real tensors this time
memory.two_training_steps(hp, network, 64, torch.bfloat16 if {bf16!r} else None)
print(status_bytes("VmHWM") - before)
"""


@pytest.mark.parametrize(
    "name,learning_rate,bf16",
    [("resnet18", 1.0, False), ("vit_ti_16", 0.0005, False), ("resnet18", 1.0, True)],
)
def test_the_step_memory_estimate_matches_a_real_steps_resident_memory(name, learning_rate, bf16):
    sets = [
        f"hyperparameters.backbone_name={name}",
        "hyperparameters.cifar_stem=true",
        "hyperparameters.augmentation.image_size=32",
        "hyperparameters.projector_hidden_dim=512",
        "hyperparameters.projection_dim=128",
        f"hyperparameters.learning_rate={learning_rate}",
    ]
    config = f"{ROOT}/const-cifar10.yaml"
    hp = parse_hparams(load_config(config, sets)["hyperparameters"], 1)
    estimate = memory.step_peak_bytes(hp, 64, torch.bfloat16 if bf16 else None)
    result = run_python("-c", MEASURE.format(root=ROOT, config=config, sets=sets, bf16=bf16))
    assert result.returncode == 0, result.stderr[-2000:]
    measured = int(result.stdout.split()[-1])
    print(
        f"{name} (bf16 {bf16}): estimate {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
    )
    assert 0.8 <= measured / estimate <= 1.6, (measured, estimate)
