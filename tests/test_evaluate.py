"""evaluate_result.py: local linear evaluation (both modes), export into torchvision, checkpoints
of multi-process runs, the cluster launch (pure config + a fake SDK), and clear errors.

One tiny BYOL run (module fixture) provides the checkpoint every test evaluates."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
import yaml
from determined import core
from determined.common.api import errors as det_errors
from PIL import Image

import backbone
import byol
import checkpoint
import cluster_eval
import data
import evaluate_result
import linear_eval
import sources
from config import parse_data_config, parse_hparams
from conftest import (
    CLASSES,
    HANG_GUARD_S,
    ROOT,
    data_dirs,
    folder_overrides,
    torchrun,
    train_tiny_run,
    write_planted_folder,
)

CHECKER = os.path.join(ROOT, "..", "shared", "tools", "expconf", "check.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch (3 steps) of the real training command on the tiny image folder."""
    return train_tiny_run(tmp_path_factory.mktemp("evaluate"))


def run(args, capsys, sdk=None):
    """The real command line in this process; returns what it printed."""
    evaluate_result.main([str(a) for a in args], sdk=sdk)
    return capsys.readouterr().out


def error_of(args, sdk=None):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_result.main([str(a) for a in args], sdk=sdk)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def load_model_state(path):
    return checkpoint.load_state(os.path.join(path, "state_dict.pth"))["models_state_dict"][0]


# ---- local evaluation ---------------------------------------------------------------------


def test_cached_features_evaluation_reports_test_accuracy(trained, tmp_path, capsys):
    out_json = tmp_path / "no-augment.json"
    printed = run(
        [
            "--checkpoint",
            trained.checkpoint,
            "--classifier-train-epochs",
            3,
            "--no-augment",
            "--output",
            out_json,
        ],
        capsys,
    )
    result = json.loads(out_json.read_text())
    lrs = [0.01, 0.03, 0.1, 0.3, 1.0]
    assert [row["lr"] for row in result["classifiers"]] == lrs
    assert (
        result["protocol"]["augment"] is False
        and result["protocol"]["classifier_train_epochs"] == 3
    )
    assert result["images"] == {"fit": 21, "holdout": 3, "test": 12}
    assert (
        result["checkpoint"]["uuid"] == trained.uuid
        and result["checkpoint"]["steps_completed"] == 3
    )
    chosen = next(row for row in result["classifiers"] if row["lr"] == result["chosen_lr"])
    assert result["test_accuracy"] == chosen["test_accuracy"]
    assert result["holdout_accuracy"] == max(
        row["holdout_accuracy"] for row in result["classifiers"]
    )
    for row in result["classifiers"]:  # counts of 12 test / 3 held-out images
        assert round(row["test_accuracy"] * 12, 6) == round(row["test_accuracy"] * 12)
        assert round(row["holdout_accuracy"] * 3, 6) == round(row["holdout_accuracy"] * 3)
    assert "test_top5_accuracy" not in result  # 3 classes: top-5 would say nothing

    # The table: a header, one row per LR, the chosen one marked, the summary line.
    assert "classifier LR" in printed and "held-out top-1" in printed and "test top-1" in printed
    assert printed.count("<- chosen") == 1
    assert f"chosen LR {result['chosen_lr']:g}" in printed
    assert f"test top-1 {100 * result['test_accuracy']:.2f}%" in printed

    # Scored on the test split's labels: with every test image copied into every class folder,
    # any classifier is right on exactly one copy of each image: 1/3, whatever it learned.
    # Training (fit and held-out split) is unchanged, so the held-out scores are too.
    every_class = tmp_path / "every-class"
    for cls in CLASSES:
        os.makedirs(every_class / cls)
        for source_cls in CLASSES:
            for f in os.listdir(trained.folder / "test" / source_cls):
                shutil.copy(
                    trained.folder / "test" / source_cls / f,
                    every_class / cls / f"{source_cls}-{f}",
                )
    run(
        [
            "--checkpoint",
            trained.checkpoint,
            "--classifier-train-epochs",
            3,
            "--no-augment",
            "--set",
            f"data.test_dir={every_class}",
            "--output",
            tmp_path / "every-class.json",
        ],
        capsys,
    )
    relabeled = json.loads((tmp_path / "every-class.json").read_text())
    assert relabeled["images"]["test"] == 36
    assert [row["test_accuracy"] for row in relabeled["classifiers"]] == pytest.approx([1 / 3] * 5)
    assert [row["holdout_accuracy"] for row in relabeled["classifiers"]] == [
        row["holdout_accuracy"] for row in result["classifiers"]
    ]


def test_augmented_evaluation_writes_evaluation_json_beside_the_checkpoint(trained, capsys):
    printed = run(
        [
            "--checkpoint",
            trained.checkpoint,
            "--classifier-train-epochs",
            2,
            "--classifier-lrs",
            0.1,
            1.0,
        ],
        capsys,
    )
    result = json.loads((trained.checkpoint / evaluate_result.EVALUATION_FILE).read_text())
    assert result["protocol"]["augment"] is True and result["protocol"]["lrs"] == [0.1, 1.0]
    assert len(result["classifiers"]) == 2 and result["chosen_lr"] in (0.1, 1.0)
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["images"]["test"] == 12
    assert "random-resized crop + flip" in printed and printed.count("<- chosen") == 1


def test_augmented_evaluation_scores_a_planted_class_exactly_and_chooses_the_lr_that_learns_it(
    trained, tmp_path, capsys
):
    """The default (augmented) evaluation through its command line, on images whose class
    fills the picture: the head whose LR learns (1.0) is chosen over one too small to move
    (1e-7) and is right on every held-out and test image."""
    train_dir = write_planted_folder(tmp_path / "train", per_class=8)
    test_dir = write_planted_folder(tmp_path / "test", per_class=4)
    run(
        [
            "--checkpoint",
            trained.checkpoint,
            "--classifier-train-epochs",
            3,
            "--classifier-lrs",
            1e-7,
            1.0,
            *data_dirs(train_dir, test_dir),
            "--output",
            tmp_path / "planted.json",
        ],
        capsys,
    )
    result = json.loads((tmp_path / "planted.json").read_text())
    assert result["protocol"]["augment"] is True
    assert result["images"] == {"fit": 21, "holdout": 3, "test": 12}
    assert result["chosen_lr"] == 1.0
    assert result["holdout_accuracy"] == 1.0 and result["test_accuracy"] == 1.0
    assert result["classifiers"][0]["holdout_accuracy"] < 1.0  # 1e-7 learns nothing


def test_augmented_crops_are_deterministic_and_agree_between_arrays_and_files(trained):
    """Arrays are cropped as a batch (roi_align), files one by one (images.EncodedImage.crops):
    same boxes, same flips."""
    files = sources.open_folder(
        str(trained.folder / "train"), None, parse_data_config({}), sources.run_here
    )
    images = np.stack(
        [np.asarray(Image.open(trained.folder / "train" / n).convert("RGB")) for n in files.names]
    )
    arrays = sources.ArraySource(images, files.labels, files.classes)
    log = data.CorruptImageLog(strict=True)
    make = lambda source: linear_eval.AugmentedImages(
        source, 16, (0.2, 1.0), (3 / 4, 4 / 3), 0, log
    )
    items = [(i, 0) for i in range(len(files))]
    from_arrays, from_files = make(arrays).__getitems__(items), make(files).__getitems__(items)
    assert from_arrays["image"].shape == from_files["image"].shape == (24, 3, 16, 16)
    assert torch.equal(from_arrays["label"], torch.as_tensor(files.labels))
    assert (from_arrays["image"] - from_files["image"]).abs().mean() < 3.0
    again = make(arrays).__getitems__(items)["image"]
    next_epoch = make(arrays).__getitems__([(i, 1) for i in range(len(files))])["image"]
    assert torch.equal(again, from_arrays["image"])
    assert (next_epoch - from_arrays["image"]).abs().mean() > 10.0


# ---- export ---------------------------------------------------------------------------------


def test_export_loads_into_torchvision_and_matches_the_online_backbone(trained, tmp_path, capsys):
    target = tmp_path / "backbone.pt"
    printed = run(["--checkpoint", trained.checkpoint, "--export", target, "--export-only"], capsys)
    assert "exported" in printed and "Linear evaluation" not in printed  # --export-only
    assert sorted(os.listdir(tmp_path)) == ["backbone.json", "backbone.pt"]  # no temp files left

    state = torch.load(target, weights_only=True)
    assert "conv1.weight" in state and "layer4.1.bn2.running_var" in state
    assert not any(
        k.startswith(("fc.", "online_", "target_", "predictor", "module.")) for k in state
    )
    # torchvision's ResNet-18 with the CIFAR stem, built here by hand.
    model = torchvision.models.resnet18(weights=None)
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert tuple(model.conv1.weight.shape) == (64, 3, 3, 3)

    # The trial's own network, restored from the checkpoint, computes the same features.
    hp = parse_hparams(yaml.safe_load(open(trained.config))["hyperparameters"])
    online, dim = backbone.build_backbone("resnet18", True, 16)
    network = byol.BYOLNetwork(online, dim, hp.projector_hidden_dim, hp.projection_dim)
    network.load_state_dict(load_model_state(trained.checkpoint))
    model.fc = torch.nn.Identity()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(x), network.eval().online_backbone(x), rtol=0, atol=1e-6
        )

    info = json.loads((tmp_path / "backbone.json").read_text())
    marker = json.loads((trained.checkpoint / checkpoint.MARKER).read_text())
    assert (
        info["architecture"] == "resnet18"
        and info["cifar_stem"] is True
        and info["image_size"] == 16
    )
    assert info["builder"] == "torchvision.models.resnet18" and info["classifier"] == "fc"
    assert info["builder_kwargs"] == {"weights": None} and info["feature_dim"] == 512
    assert info["replace_modules"] == {
        "conv1": {
            "type": "Conv2d",
            "in_channels": 3,
            "out_channels": 64,
            "kernel_size": 3,
            "stride": 1,
            "padding": 1,
            "bias": False,
        },
        "maxpool": {"type": "Identity"},
    }
    assert info["normalization"] == marker["normalization"]
    assert info["checkpoint_uuid"] == trained.uuid and info["steps_completed"] == 3
    assert info["checkpoint"] == str(trained.checkpoint)


# ---- checkpoints of multi-process runs -------------------------------------------------------


def test_checkpoint_with_ddp_prefixed_keys_loads(trained, tmp_path):
    """A multi-process run saves the DistributedDataParallel-wrapped model: every key starts with
    'module.'. Made here from the real checkpoint (the torchrun test below makes a real one)."""
    copy = tmp_path / trained.uuid
    shutil.copytree(trained.checkpoint, copy)
    state = checkpoint.load_state(str(copy / "state_dict.pth"))
    state["models_state_dict"][0] = {
        f"module.{k}": v for k, v in state["models_state_dict"][0].items()
    }
    torch.save(state, copy / "state_dict.pth")
    plain = checkpoint.read(str(trained.checkpoint)).backbone_state
    wrapped = checkpoint.read(str(copy)).backbone_state
    assert plain.keys() == wrapped.keys() and all(torch.equal(plain[k], wrapped[k]) for k in plain)


@pytest.mark.multiprocess
def test_checkpoint_of_a_two_process_run_exports(trained, tmp_path, capsys):
    command, env = torchrun(
        2,
        [trained.config, "--checkpoint-dir", tmp_path / "ckpt", *folder_overrides(trained.folder)],
    )
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (uuid,) = os.listdir(tmp_path / "ckpt" / "determined")
    checkpoint = tmp_path / "ckpt" / "determined" / uuid
    assert all(k.startswith("module.") for k in load_model_state(checkpoint))
    run(["--checkpoint", checkpoint, "--export", tmp_path / "b.pt", "--export-only"], capsys)
    assert json.loads((tmp_path / "b.json").read_text())["checkpoint_uuid"] == uuid
    # torchvision's ResNet-18 with the CIFAR stem, built here by hand.
    model = torchvision.models.resnet18(weights=None)
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    missing, unexpected = model.load_state_dict(
        torch.load(tmp_path / "b.pt", weights_only=True), strict=False
    )
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


# ---- errors -----------------------------------------------------------------------------------


def test_wrong_path_and_foreign_checkpoints_are_refused(trained, tmp_path):
    epochs = ["--classifier-train-epochs", 1]
    assert "does not exist" in error_of(["--checkpoint", tmp_path / "nope", *epochs])

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "load_data.json").write_text(json.dumps({"trial_cls_spec": "mnist:MNISTTrial"}))
    (foreign / "metadata.json").write_text(json.dumps({"steps_completed": 1}))
    assert "belongs to 'mnist:MNISTTrial'" in error_of(["--checkpoint", foreign, *epochs])

    not_a_checkpoint = tmp_path / "photos"
    not_a_checkpoint.mkdir()
    assert "is not a Determined checkpoint" in error_of(["--checkpoint", not_a_checkpoint, *epochs])

    # The --checkpoint-dir instead of a checkpoint in it: the message names the checkpoint.
    message = error_of(["--checkpoint", trained.root / "ckpt", *epochs])
    assert "is not a Determined checkpoint" in message and str(trained.checkpoint) in message

    # Output places are checked before the evaluation, by the rule --checkpoint-dir follows.
    (tmp_path / "file").write_text("")
    output = tmp_path / "file" / "result.json"
    assert error_of(["--checkpoint", trained.checkpoint, *epochs, "--output", output]) == (
        f"error: --output {str(output.parent)!r} is not a writable directory: File exists"
    )
    export = "/proc/forbidden-dir/backbone.pt"  # refused even to root
    assert error_of(["--checkpoint", trained.checkpoint, "--export", export, "--export-only"]) == (
        "error: --export '/proc/forbidden-dir' is not a writable directory: "
        "No such file or directory"
    )


def test_checkpoint_uuid_off_cluster_says_what_to_do():
    message = error_of(["--checkpoint-uuid", "abc", "--classifier-train-epochs", 1])
    assert "--checkpoint DIR" in message


# ---- cluster: the evaluation experiment's config, launch, and the in-task run ----------------


def original_config(name):
    with open(os.path.join(ROOT, name)) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize(
    "name", ["const-cifar10.yaml", "distributed-stl10.yaml", "distributed-imagenet.yaml"]
)
def test_evaluation_experiment_config(name, tmp_path):
    original = original_config(name)
    before = json.dumps(original, sort_keys=True)
    hparams = dict(original["hyperparameters"], epochs=5)
    config = cluster_eval.evaluation_experiment_config(
        original,
        "0f1e2d3c-uuid",
        80,
        augment=False,
        hparams=hparams,
        overrides=["data.num_workers=2"],
        batch_size=512,
        lrs=[0.1, 1.0],
    )
    assert json.dumps(original, sort_keys=True) == before  # pure: the input is untouched
    assert config["name"] == original["name"] + "-linear-eval"
    assert config["entrypoint"] == [
        "python3",
        "evaluate_result.py",
        "--checkpoint-uuid",
        "0f1e2d3c-uuid",
        "--classifier-train-epochs",
        "80",
        "--no-augment",
        "--batch-size",
        "512",
        "--classifier-lrs",
        "0.1",
        "1",
        "--set",
        "data.num_workers=2",
    ]
    parsed = evaluate_result.parse_args(config["entrypoint"][2:])  # the task's command line is ours
    assert (
        parsed.checkpoint_uuid,
        parsed.classifier_train_epochs,
        parsed.no_augment,
        parsed.batch_size,
        parsed.classifier_lrs,
        parsed.overrides,
    ) == ("0f1e2d3c-uuid", 80, True, 512, [0.1, 1.0], ["data.num_workers=2"])
    assert config["resources"]["slots_per_trial"] == 1
    assert config["searcher"] == {
        "name": "single",
        "metric": "holdout_accuracy",
        "smaller_is_better": False,
    }
    assert config["hyperparameters"] == hparams
    for kept in ("data", "checkpoint_storage", "reproducibility", "max_restarts"):
        assert config[kept] == original[kept]
    augmented = cluster_eval.evaluation_experiment_config(original, "u", 80, augment=True)
    assert "--no-augment" not in augmented["entrypoint"]
    assert augmented["hyperparameters"] == original["hyperparameters"]

    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    if not os.path.isfile(CHECKER):
        pytest.skip("../shared/tools/expconf/check.py (Determined 0.38.1's schemas) is not here")
    checked = subprocess.run([sys.executable, CHECKER, str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


class FakeSDK:
    """determined.experimental.client's get_experiment/create_experiment, no master."""

    def __init__(self, experiments):
        self.experiments, self.created = experiments, []

    def get_experiment(self, experiment_id):
        if experiment_id not in self.experiments:
            # What the SDK raises on the master's 404.
            raise det_errors.NotFoundException(f"experiment {experiment_id} not found")
        return self.experiments[experiment_id]

    def create_experiment(self, config, model_dir):
        self.created.append((config, model_dir))
        return SimpleNamespace(id=42)


class FakeExperiment:
    """Only list_checkpoints: calling the deprecated top_checkpoint() would fail here."""

    def __init__(self, checkpoints):
        self.checkpoints, self.calls = checkpoints, []

    def list_checkpoints(self, sort_by=None, order_by=None, max_results=None):
        self.calls.append((sort_by, order_by, max_results))
        return self.checkpoints[:max_results]


# evaluate_result.py --experiment-id against the FakeSDK's master.
LAUNCH = [
    "--experiment-id",
    17,
    "--classifier-train-epochs",
    80,
    "--master",
    "http://master.example:8080",
]


def test_missing_experiment_gives_one_line_error():
    message = error_of(
        LAUNCH,
        sdk=FakeSDK({}),
    )
    assert "experiment 17 was not found on the master at http://master.example:8080" in message


def test_experiment_without_checkpoints_gives_one_line_error():
    message = error_of(
        ["--experiment-id", 17, "--classifier-train-epochs", 80],
        sdk=FakeSDK({17: FakeExperiment([])}),
    )
    assert "experiment 17 has no completed checkpoint" in message


def test_launch_starts_the_evaluation_experiment_from_the_best_checkpoint(capsys):
    original = original_config("const-cifar10.yaml")
    best = SimpleNamespace(
        uuid="best-uuid",
        training=SimpleNamespace(experiment_config=original, hparams=original["hyperparameters"]),
    )
    experiment = FakeExperiment([best, SimpleNamespace(uuid="worse")])
    sdk = FakeSDK({17: experiment})
    printed = run(
        LAUNCH,
        capsys,
        sdk,
    )
    assert experiment.calls == [(None, None, 1)]  # sorted by the searcher metric, best first
    ((config, model_dir),) = sdk.created
    assert model_dir == ROOT
    assert config["entrypoint"][:4] == [
        "python3",
        "evaluate_result.py",
        "--checkpoint-uuid",
        "best-uuid",
    ]
    assert (
        "started evaluation experiment 42: http://master.example:8080/det/experiments/42/overview"
        in printed
    )


def test_unreachable_master_gives_one_line_error():
    # The real SDK against a port nobody listens on.
    message = error_of(
        ["--experiment-id", 17, "--classifier-train-epochs", 80, "--master", "http://127.0.0.1:9"]
    )
    assert "cannot reach a Determined master at http://127.0.0.1:9" in message


def test_in_cluster_mode_reports_the_result_as_validation_metrics(trained):
    """The evaluation task's path, with Determined's off-cluster core context: the checkpoint
    comes from checkpoint storage by uuid, the result goes to report_validation_metrics."""
    args = evaluate_result.parse_args(
        ["--checkpoint-uuid", trained.uuid, "--classifier-train-epochs", "2", "--no-augment"]
    )
    reported = []
    with core.init(checkpoint_storage=str(trained.checkpoint.parent)) as context:
        context.train.report_validation_metrics = lambda steps_completed, metrics: reported.append(
            (steps_completed, metrics)
        )
        result = evaluate_result.evaluate_in_cluster(args, context, data_section=None)
    ((steps, metrics),) = reported
    assert steps == 2 and metrics["test_accuracy"] == result["test_accuracy"]
    assert metrics["classifier_best_lr"] == result["chosen_lr"]
    assert (
        "classifier_lr_0.1_test_accuracy" in metrics
        and result["checkpoint"]["uuid"] == trained.uuid
    )


def test_the_documented_backbone_snippet_runs_as_written_and_matches_evaluation(
    trained, tmp_path, capsys, monkeypatch
):
    """docs/evaluation.md's Python block, pasted as it is next to an export and an image, gives the
    features the package's own evaluation pipeline gives (data.center_crop, device.Normalize)."""
    import re

    import device

    readme = open(os.path.join(ROOT, "docs", "evaluation.md")).read()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "preprocess" in b]
    run(
        ["--checkpoint", trained.checkpoint, "--export", tmp_path / "backbone.pt", "--export-only"],
        capsys,
    )
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "docs/evaluation.md", "exec"), namespace)

    info = json.loads((tmp_path / "backbone.json").read_text())
    crop = data.center_crop(Image.open(tmp_path / "image.png").convert("RGB"), info["image_size"])
    normalize = device.Normalize(
        info["normalization"]["mean"], info["normalization"]["std"], torch.device("cpu")
    )
    ckpt = checkpoint.read(str(trained.checkpoint))
    ours, _ = checkpoint.load_backbone(ckpt, checkpoint.hparams_of(ckpt))
    with torch.no_grad():
        expected = ours(normalize(crop[None]))
    torch.testing.assert_close(namespace["features"], expected, rtol=0, atol=1e-5)
