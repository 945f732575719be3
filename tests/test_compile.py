"""What `compile: auto` compiles on a GPU, checked on the CPU: the augmentation and the online
and target networks of each backbone family trace into one graph each, with no graph break, and
a whole short run compiles each region once. Dynamo makes the graphs and decides the breaks and
recompiles, whatever backend then compiles them, so the tests give dynamo the `eager` backend:
inductor's C++ and Triton compilation (minutes on a CPU) is not what is checked."""

import json

import pytest
import torch

import augment
import backbone
import byol
import model_def
from conftest import folder_overrides, tiny_config
from test_backbones import FAMILY_MEMBERS

# (name, cifar_stem, size): ResNet-18 and the member of each other family that
# tests/test_backbones.py trains, at the configs' 32 px with the small-image stem.
MEMBERS = [(name, True, 32) for name in ["resnet18", *(m[0] for m in FAMILY_MEMBERS)]]


@pytest.mark.parametrize("name,cifar_stem,size", MEMBERS)
def test_the_network_of_each_family_is_one_graph_without_a_break(name, cifar_stem, size):
    torch.manual_seed(0)
    net, width = backbone.build_backbone(name, cifar_stem, size)
    network = byol.BYOLNetwork(net, width, 64, 32).train()
    views = torch.randn(8, 3, size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as precision: auto autocasts a GPU step
        explained = torch._dynamo.explain(network)(views)
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_the_augmentation_is_one_graph_without_a_break(tmp_path):
    from config import load_config, parse_hparams

    hp = parse_hparams(load_config(str(tiny_config(tmp_path)))["hyperparameters"])
    two_views = augment.TwoViewAugmentation(hp.augmentation, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    keys = augment.sample_keys(0, 0, torch.arange(8))
    explained = torch._dynamo.explain(two_views)(images, keys)
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def compiled_run(run_dir, image_folder, monkeypatch, caplog, *sets):
    """The tiny config's 2 epochs (3 steps each, validated and checkpointed after each) with
    the augmentation on the device, compiled (dynamo's `eager` backend) or not: (the training
    losses as reported, the regions compiled, dynamo's counters)."""
    compiled = []
    real_compile = torch.compile

    def compile_with_eager_backend(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_eager_backend)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_dir.mkdir()
    args = [str(tiny_config(run_dir)), "--checkpoint-dir", str(run_dir / "ckpt")]
    for s in [*folder_overrides(image_folder)[1::2], "hyperparameters.augment_on=device", *sets]:
        args += ["--set", s]
    caplog.clear()
    with caplog.at_level("INFO"):
        model_def.main(args)
    losses = [
        r.getMessage().split("'loss': ")[1].split(",")[0]
        for r in caplog.records
        if "report_training_metrics" in r.getMessage()
    ]
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()}
    torch._dynamo.reset()
    return losses, compiled, counters


def test_a_compiled_run_compiles_each_region_once_and_trains_as_eager(
    tmp_path, image_folder, monkeypatch, caplog
):
    """Training batches are all full (the sampler drops an epoch's last partial batch), and the
    probe's validation runs the backbone eager: one graph for the augmentation and one for the
    network, never recompiled over 2 epochs, validations and checkpoints; the losses are the
    eager run's, bit for bit (the same ops, run by dynamo's eager backend)."""
    losses, compiled, counters = compiled_run(
        tmp_path / "compiled", image_folder, monkeypatch, caplog, "hyperparameters.compile=true"
    )
    assert len(compiled) == 2  # the augmentation and the network
    assert counters["stats"]["unique_graphs"] == 2 and counters["frames"]["ok"] == 2
    assert "recompiles" not in counters
    eager, _, _ = compiled_run(
        tmp_path / "eager", image_folder, monkeypatch, caplog, "hyperparameters.compile=false"
    )
    assert len(losses) == 6 and losses == eager


def test_the_loss_validation_compiles_once_per_mode_and_shape(
    tmp_path, image_folder, monkeypatch, caplog
):
    """Without labels, validation runs the compiled augmentation and network on fixed views of
    12 test images in per-slot batches of 8 and 4. The augmentation runs without gradients
    in training too, so it compiles twice: the batch of 8, and the short batch (dynamo then
    makes the batch size dynamic). The network compiles three times: training, validation
    without gradients, and its short batch. Nothing more over 2 epochs and 2 validations."""
    sets = [
        "hyperparameters.compile=true",
        "hyperparameters.validate_with_classifier=false",
        "searcher.metric=validation_loss",
        "searcher.smaller_is_better=true",
    ]
    _, compiled, counters = compiled_run(tmp_path / "run", image_folder, monkeypatch, caplog, *sets)
    assert len(compiled) == 2
    assert counters["stats"]["unique_graphs"] == 5 and counters["frames"]["ok"] == 5


RESUMED = """
import json, sys
import torch
sys.path.insert(0, {root!r})
real_compile = torch.compile
torch.compile = lambda fn, **kwargs: real_compile(fn, **dict(kwargs, backend="eager"))
import model_def
model_def.main({args!r})
print("COUNTERS " + json.dumps({{k: dict(v) for k, v in torch._dynamo.utils.counters.items()}}))
"""


def test_a_compiled_run_resumed_in_a_new_process_compiles_each_region_once_and_continues_exactly(
    tmp_path, image_folder, monkeypatch, caplog
):
    """A resume is a new process, as on a cluster: it compiles the augmentation and the network
    once each (2 graphs, no recompile), and its training losses are the uninterrupted compiled
    run's from the checkpoint on."""
    from conftest import ROOT, checkpoints_by_step, run_python

    losses, _, _ = compiled_run(
        tmp_path / "whole", image_folder, monkeypatch, caplog, "hyperparameters.compile=true"
    )
    (after_epoch_1,) = checkpoints_by_step(tmp_path / "whole" / "ckpt")[3]
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    args = [str(tiny_config(run_dir)), "--checkpoint-dir", str(run_dir / "ckpt")]
    sets = [*folder_overrides(image_folder)[1::2], "hyperparameters.augment_on=device"]
    for s in sets + ["hyperparameters.compile=true"]:
        args += ["--set", s]
    args += ["--resume", str(after_epoch_1)]
    script = RESUMED.format(root=ROOT, args=args)
    result = run_python("-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    counters = json.loads(result.stdout.split("COUNTERS ")[1])
    assert counters["stats"]["unique_graphs"] == 2 and "recompiles" not in counters
    resumed = [
        line.split("'loss': ")[1].split(",")[0]
        for line in result.stderr.splitlines() + result.stdout.splitlines()
        if "report_training_metrics" in line
    ]
    assert resumed == losses[3:]
