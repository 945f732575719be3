"""Backbones beyond ResNet: one small member of each family trains, resumes exactly, exports to
a file that torchvision alone loads in a fresh process, fine-tunes and draws its pictures; weight decay and trust scaling reach
only the weights a layer multiplies its input by, found by watching the model compute; the
combinations that cannot work are refused in one line; AdamW is torch's own update."""

import json
import os
import re
import shutil

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

import backbone
import byol
import checkpoint
import evaluate_result
import finetune
import model_def
import optim
from conftest import (
    ROOT,
    assert_same_training_state,
    checkpoints_by_step,
    folder_overrides,
    run_python,
    tiny_config,
    tiny_finetune_config,
    write_image_folder,
)

# (name, cifar_stem, image size): the smallest torchvision member of each family past ResNet
# (ResNet-18 has tests of its own), each with a final feature map of at least 1x1 (2x2 for the
# transformers) at the size.
FAMILY_MEMBERS = [
    ("regnet_x_400mf", False, 16),
    ("efficientnet_b0", False, 16),
    ("convnext_tiny", True, 16),
    ("vit_ti_16", True, 16),
    ("swin_t", True, 32),
]


def train(config, checkpoint_dir, *extra):
    os.chdir(ROOT)
    model_def.main([str(config), "--checkpoint-dir", str(checkpoint_dir), *map(str, extra)])


@pytest.mark.parametrize("name,cifar_stem,size", FAMILY_MEMBERS)
def test_each_family_trains_resumes_exactly_exports_fine_tunes_and_draws(
    tmp_path, caplog, name, cifar_stem, size
):
    folder = write_image_folder(tmp_path / "images")
    transformer = not backbone.is_convolutional(name)
    # A transformer gets AdamW, which needs an AdamW-sized LR; base 0.0096 x 8 / 256 = 0.0003.
    lr = {"learning_rate": 0.0096} if transformer else {}
    config = tiny_config(tmp_path, backbone_name=name, cifar_stem=cifar_stem, epochs=1, **lr)
    extra = [
        *folder_overrides(folder),
        "--set",
        f"hyperparameters.augmentation.image_size={size}",
        "--set",
        "min_checkpoint_period={batches: 1}",
    ]
    with caplog.at_level("INFO"):
        train(config, tmp_path / "full", *extra)
    full = checkpoints_by_step(tmp_path / "full")
    assert sorted(full) == [1, 2, 3]
    # The probe and kNN ran on the family's features at the epoch's end.
    (validation,) = re.findall(
        r"report_validation_metrics\(steps_completed=3, metrics=(.*)\)", caplog.text
    )
    assert "'knn_accuracy'" in validation and "'test_accuracy'" in validation

    # The optimizer the family gets by default, its state, and the warmup's LRs (1 epoch = 3
    # steps of warmup: peak x 0/3, 1/3, 2/3 at steps 1-3).
    state = checkpoint.load_state(str(full[3][0] / "state_dict.pth"))
    opt_state = state["optimizers_state_dict"][0]
    some_state = next(iter(opt_state["state"].values()))
    assert sorted(some_state) == (
        ["exp_avg", "exp_avg_sq", "step"] if transformer else ["momentum_buffer"]
    )
    peak = (0.0096 if transformer else 1.0) * 8 / 256
    reported = re.findall(
        r"report_training_metrics\(steps_completed=(\d), metrics=\{'learning_rate': ([^,]+),",
        caplog.text,
    )
    assert [(int(s), float(v)) for s, v in reported] == [
        (1, 0.0),
        (2, pytest.approx(peak / 3, rel=1e-12)),
        (3, pytest.approx(2 * peak / 3, rel=1e-12)),
    ]

    # Resumed from step 2, step 3 is the uninterrupted run's, bit for bit.
    train(config, tmp_path / "resumed", *extra, "--resume", full[2][0])
    resumed = checkpoints_by_step(tmp_path / "resumed")
    assert sorted(resumed) == [3]
    assert_same_training_state(full[3][0], resumed[3][0])

    # Exported, then rebuilt by docs/evaluation.md's snippet in a fresh process that cannot import this
    # package (isolated mode, another directory): the same features as the package's own.
    out = tmp_path / "export"
    out.mkdir()
    evaluate_result.main(
        ["--checkpoint", str(full[3][0]), "--export", str(out / "backbone.pt"), "--export-only"]
    )
    info = json.loads((out / "backbone.json").read_text())
    assert info["architecture"] == name and info["cifar_stem"] is cifar_stem
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    torch.save(x, out / "x.pt")
    shutil.copy(next((folder / "test" / "cat").iterdir()), out / "image.png")  # the snippet's
    readme = open(os.path.join(ROOT, "docs", "evaluation.md")).read()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "preprocess" in b]
    script = snippet + (
        "\nassert __import__('importlib').util.find_spec('backbone') is None  # not ours\n"
        "with torch.no_grad():\n"
        "    torch.save(model(torch.load('x.pt', weights_only=True)), 'features.pt')\n"
    )
    (out / "load.py").write_text(script)
    result = run_python("-I", "load.py", cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(out / "features.pt", weights_only=True)
    ckpt = checkpoint.read(str(full[3][0]))
    ours, width = checkpoint.load_backbone(ckpt, checkpoint.hparams_of(ckpt))
    with torch.no_grad():
        torch.testing.assert_close(theirs, ours(x), rtol=0, atol=1e-5)
    assert theirs.shape == (3, width) == (3, info["feature_dim"])

    # Fine-tuned from the checkpoint with the backbone frozen (a linear probe), following its
    # architecture: the backbone comes out as the checkpoint's online backbone, every tensor.
    ft_config = tmp_path / "finetune.yaml"
    with open(ft_config, "w") as f:
        source = {"checkpoint": str(full[3][0])}
        yaml.safe_dump(
            tiny_finetune_config(
                tmp_path, folder, pretrained=source, backbone_name=None, cifar_stem=None,
                image_size=None, backbone_lr_scale=0.0,
            ),
            f,
        )  # fmt: skip
    finetune.main([str(ft_config), "--checkpoint-dir", str(tmp_path / "ft")])
    (ft_dir,) = checkpoints_by_step(tmp_path / "ft").values()
    model = checkpoint.load_state(str(ft_dir[0] / "state_dict.pth"))["models_state_dict"][0]
    tuned = {k[len("backbone.") :]: v for k, v in model.items() if k.startswith("backbone.")}
    online = state["models_state_dict"][0]
    source_backbone = {
        k[len("online_backbone.") :]: v
        for k, v in online.items()
        if k.startswith("online_backbone.")
    }
    assert tuned.keys() == source_backbone.keys()
    assert all(torch.equal(tuned[k], source_backbone[k]) for k in tuned)

    # The evaluation draws its pictures from the family's features.
    evaluate_result.main(
        [
            "--checkpoint",
            str(full[3][0]),
            "--classifier-train-epochs",
            "2",
            "--pictures",
            str(tmp_path / "pictures"),
        ]
    )
    assert {"neighbours.png", "confusion.png"} <= set(os.listdir(tmp_path / "pictures"))


class MatrixOperands(TorchDispatchMode):
    """Records which parameters a forward pass multiplies its activations by: the weight of
    a convolution, a factor of a matrix product. Additions, normalisations, indexing and
    elementwise scaling are not recorded."""

    PRODUCTS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2)}

    def __init__(self, params):
        super().__init__()
        self.by_storage = {p.untyped_storage().data_ptr(): p for p in params}
        self.multiplied = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket.__name__
        positions = (1,) if op == "convolution" else self.PRODUCTS.get(op, ())
        for i in positions:
            if isinstance(args[i], torch.Tensor):
                p = self.by_storage.get(args[i].untyped_storage().data_ptr())
                if p is not None:
                    self.multiplied.add(p)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "name,cifar_stem,size",
    [("resnet18", True, 32), ("swin_v2_t", True, 32), ("vit_b_16", False, 32)] + FAMILY_MEMBERS,
)
def test_decay_and_trust_scaling_reach_only_the_weights_layers_multiply_by(name, cifar_stem, size):
    torch.manual_seed(0)
    net, width = backbone.build_backbone(name, cifar_stem, size)
    network = byol.BYOLNetwork(net, width, 32, 16).train()
    trained = [p for p in network.parameters() if p.requires_grad]
    walk = MatrixOperands(trained)
    with walk:
        network(torch.randn(4, 3, size, size))
    decayed, excluded = optim.parameter_groups(network, 1e-6)
    names = {p: n for n, p in network.named_parameters()}
    assert {names[p] for p in decayed["params"]} == {names[p] for p in walk.multiplied}
    assert len(decayed["params"]) + len(excluded["params"]) == len(trained)
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    left_out = {names[p] for p in excluded["params"]}
    # What the walk left out, by what it is (checked above by behaviour, shown here by name).
    if name.startswith("vit"):
        assert {"online_backbone.class_token", "online_backbone.encoder.pos_embedding"} <= left_out
    if name.startswith("swin"):
        assert any("relative_position" in n or "logit_scale" in n for n in left_out)
    if name.startswith("convnext"):
        assert any(n.endswith("layer_scale") for n in left_out)


@pytest.mark.parametrize(
    "sets,expected",
    [
        (
            ["hyperparameters.backbone_name=swin_t", "hyperparameters.cifar_stem=false"],
            "hyperparameters.backbone_name=swin_t (Swin, cifar_stem=false) on 16-px images ends "
            "in a 1x1 feature map; a Swin needs at least 2x2: set hyperparameters.cifar_stem=true "
            "(patch 2, 4x4 windows) or use larger images",
        ),
        (
            [
                "hyperparameters.backbone_name=vit_b_32",
                "hyperparameters.cifar_stem=false",
                "hyperparameters.augmentation.image_size=32",
            ],
            "hyperparameters.backbone_name=vit_b_32 (ViT, cifar_stem=false) on 32-px images ends "
            "in a 1x1 feature map; a ViT needs at least 2x2: set hyperparameters.cifar_stem=true "
            "(patch 4 up to 64 px, else 8) or use larger images",
        ),
        (
            ["hyperparameters.backbone_name=vit_b_16", "hyperparameters.learning_rate=1.0"],
            "hyperparameters.learning_rate=1.0 is a LARS learning rate; with optimizer=adamw (the "
            "default for ViT and Swin) the base LR must be at most 0.01 (DINO's is 0.0005), or "
            "set hyperparameters.optimizer=lars",
        ),
        (
            ["hyperparameters.backbone_name=mobilenet_v2"],
            "hyperparameters.backbone_name='mobilenet_v2' is not a known backbone: a torchvision "
            "classifier of the families",
        ),
    ],
)
def test_a_backbone_that_cannot_work_is_refused_in_one_line_before_any_work(
    tmp_path, sets, expected
):
    config = tiny_config(tmp_path)
    args = [str(config), "--checkpoint-dir", str(tmp_path / "ckpt")]
    for s in sets:
        args += ["--set", s]
    with pytest.raises(SystemExit) as exit_info:
        model_def.main(args)
    message = str(exit_info.value.code)
    assert message.startswith("error: " + expected) and "\n" not in message, message
    assert not (tmp_path / "ckpt").exists()


def test_adamw_is_torchs_adamw_and_a_skipped_step_changes_nothing():
    torch.manual_seed(0)
    ours = [torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]

    def groups(params):
        return [
            {"params": params[:1], "weight_decay": 0.05},
            {"params": params[1:], "weight_decay": 0.0},
        ]

    adamw = optim.AdamW(groups(ours), lr=1e-2)
    reference = torch.optim.AdamW(groups(theirs), lr=1e-2, foreach=False)
    for step in range(12):
        grads = [torch.randn_like(p) for p in ours]
        if step == 4:  # a non-finite step: gradients zeroed, the flag false
            before = [p.detach().clone() for p in ours]
            moments = {k: {n: t.clone() for n, t in v.items()} for k, v in adamw.state.items()}
            for p in ours:
                p.grad = torch.zeros_like(p)
            adamw.apply_only_if(torch.tensor(False))
            adamw.step()
            assert all(torch.equal(a, b) for a, b in zip(before, ours))
            for p, state in adamw.state.items():
                assert all(torch.equal(state[n], moments[p][n]) for n in state)
            continue
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step % 2:
            adamw.apply_only_if(torch.tensor(True))
        adamw.step()
        reference.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert adamw.state[ours[0]]["step"].item() == reference.state[theirs[0]]["step"].item() == 11


def test_looking_up_an_architecture_leaves_the_seeded_initialisation_alone():
    """The refusal check builds a model to read its shapes before the trial seeds and builds
    its own: a seeded network must be the same whether that lookup ran first or not."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    backbone.check_input_size("resnet34", False, 72)  # not looked up before in this process
    assert torch.equal(torch.rand(3), expected)
