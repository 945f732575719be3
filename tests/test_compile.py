"""What `compile: auto` compiles on a GPU, checked on the CPU: the augmentation and the online
and target networks of each backbone family trace into one graph each, with no graph break, and
a whole short run compiles each region once. Dynamo makes the graphs and decides the breaks and
recompiles, whatever backend then compiles them, so the tests give dynamo the `eager` backend:
inductor's C++ and Triton compilation (minutes on a CPU) is not what is checked."""

import pytest
import torch

import augment
import backbone
import byol
import model_def
from conftest import folder_overrides, tiny_config

# (name, cifar_stem, size): a member of each family, at the size of the configs that use it.
MEMBERS = [
    ("resnet18", True, 32),
    ("regnet_x_400mf", True, 32),
    ("efficientnet_b0", True, 32),
    ("convnext_tiny", True, 32),
    ("vit_ti_16", True, 32),
    ("swin_t", True, 32),
]


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


def test_a_compiled_run_compiles_each_region_once_and_trains_as_eager(
    tmp_path, image_folder, monkeypatch, caplog
):
    """2 epochs of 3 steps with validations and checkpoints, compile: true, augmentation on the
    device: one graph for the augmentation and one for the network, never recompiled; the
    losses are the eager run's."""
    compiled = []
    real_compile = torch.compile

    def compile_with_eager_backend(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_eager_backend)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses = {}
    for setting in ("true", "false"):
        args = [str(tiny_config(tmp_path)), "--checkpoint-dir", str(tmp_path / setting)]
        for s in [
            *folder_overrides(image_folder)[1::2],
            f"hyperparameters.compile={setting}",
            "hyperparameters.augment_on=device",
        ]:
            args += ["--set", s]
        caplog.clear()
        with caplog.at_level("INFO"):
            model_def.main(args)
        losses[setting] = [
            r.getMessage().split("'loss': ")[1].split(",")[0]
            for r in caplog.records
            if "report_training_metrics" in r.getMessage()
        ]
        if setting == "true":
            assert len(compiled) == 2  # the augmentation and the network
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
            assert torch._dynamo.utils.counters["frames"]["ok"] == 2
            assert not torch._dynamo.utils.counters["recompiles"]
    assert len(losses["true"]) == 6 and losses["true"] == losses["false"]
