"""Every bad input a user can write is refused before training, with a message naming the value
and what is allowed. docs/errors.md's table of bad inputs lists the same cases."""

import os
import re

import pytest
import torch
import yaml

import device
import model_def
from config import (
    NO_LABELS_SEARCHER,
    ConfigError,
    apply_override,
    load_config,
    parse_experiment_config,
    parse_hparams,
)
from conftest import KNOWN_FAMILIES, data_dirs, folder_overrides, tiny_config


def run(args):
    """Run the real command line; return its error message (it must fail)."""
    with pytest.raises(SystemExit) as exit_info:
        model_def.main([str(a) for a in args])
    return str(exit_info.value.code)


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            "hyperparameters.backbone_name=resnet9",
            "backbone_name='resnet9' is not a known backbone (did you mean resnet50?): "
            + KNOWN_FAMILIES,
        ),
        (
            "hyperparameters.dataset_name=mnist",
            "dataset_name='mnist' is not one of: cifar10, stl10, image_folder",
        ),
        ("hyperparameters.learning_rate=0", "learning_rate=0 must be a number in (0.0, inf]"),
        ("hyperparameters.learning_rate=-0.1", "learning_rate=-0.1 must be a number in (0.0, inf]"),
        ("hyperparameters.epochs=0", "epochs=0 must be an integer >= 1"),
        ("hyperparameters.global_batch_size=1", "global_batch_size=1 must be an integer >= 2"),
        (
            "hyperparameters.augmentation.flip_prob=1.5",
            "flip_prob=1.5 must be a number in [0.0, 1.0]",
        ),
        ("hyperparameters.augment_on=gpu", "augment_on='gpu' is not one of: auto, device, loader"),
        ("hyperparameters.compile=maybe", "compile='maybe' is not one of: auto, true, false"),
        ("hyperparameters.compile=1", "compile=1 is not one of: auto, true, false"),
        (
            "hyperparameters.classifier_lrs=[]",
            "classifier_lrs=[] must be a non-empty list of positive numbers",
        ),
        (
            "hyperparameters.augmentation.crop_scale=[0.9, 0.1]",
            "crop_scale=[0.9, 0.1] must be a pair [min, max]",
        ),
        ("hyperparameters.nonsense.deep=1", "'nonsense' does not exist under hyperparameters"),
        ("searcher.max_length.epochs=3", "'max_length' does not exist under searcher"),
        ("no_equals_sign", "expected DOTTED.PATH=VALUE"),
        (
            "searcher.metric=test_accuracy",
            "searcher.metric='test_accuracy': with hyperparameters.validate_with_classifier=true the searcher and checkpoint_policy choose by holdout_accuracy",
        ),
        (
            "searcher.smaller_is_better=true",
            "searcher.smaller_is_better=true is wrong for searcher.metric=holdout_accuracy: it must be false",
        ),
        (
            "hyperparameters.validate_with_classifier=false",
            "with hyperparameters.validate_with_classifier=false the searcher and checkpoint_policy choose by validation_loss",
        ),
        (
            "checkpoint_policy=sometimes",
            "checkpoint_policy='sometimes' is not one of: best, all, none",
        ),
        (
            "min_validation_period={epochs: -1}",
            "min_validation_period={'epochs': -1} must be {epochs: N} or {batches: N} with N an integer >= 0",
        ),
        ("scheduling_unit=0", "scheduling_unit=0 must be an integer >= 1"),
    ],
)
def test_bad_values_are_refused_with_the_value_and_the_rule(tmp_path, override, expected):
    message = run([tiny_config(tmp_path), "--set", override])
    assert message.startswith("error: ") and expected in message


def test_unknown_hyperparameter_key_is_refused(tmp_path):
    path = tiny_config(tmp_path, lerning_rate=0.1)
    assert "unknown key(s) lerning_rate" in run([path])


def test_batch_that_cannot_be_split_over_slots_is_refused():
    raw = yaml.safe_load(
        open(os.path.join(model_def.__file__.rsplit("/", 1)[0], "const-cifar10.yaml"))
    )["hyperparameters"]
    raw["global_batch_size"] = 10
    with pytest.raises(ConfigError, match="global_batch_size=10 cannot be split over 4 slots"):
        parse_hparams(raw, slots=4)
    raw["global_batch_size"] = 6
    with pytest.raises(ConfigError, match="at least 2 images per slot"):
        parse_hparams(raw, slots=6)
    assert parse_hparams(raw, slots=3).global_batch_size == 6


def test_malformed_yaml_and_missing_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hyperparameters: {global_batch_size: 8\n")
    assert "is not valid yaml" in run([bad])
    assert "does not exist" in run([tmp_path / "missing.yaml"])


def test_missing_and_empty_data_dirs(tmp_path, image_folder):
    config = tiny_config(tmp_path)
    message = run(
        [
            config,
            "--set",
            "hyperparameters.dataset_name=image_folder",
            *data_dirs(tmp_path / "nowhere", image_folder / "test"),
        ]
    )
    assert f"image folder '{tmp_path / 'nowhere'}' does not exist" in message
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    message = run(
        [
            config,
            "--set",
            "hyperparameters.dataset_name=image_folder",
            *data_dirs(tmp_path / "empty", image_folder / "test"),
        ]
    )
    assert "holds no images" in message and str(tmp_path / "empty") in message
    assert "needs data.train_dir" in run(
        [config, "--set", "hyperparameters.dataset_name=image_folder"]
    )


def test_one_class_folder_is_refused_when_evaluation_needs_two(tmp_path, image_folder):
    for split in ("train", "test"):
        for cls in ("cat", "ship"):
            for f in (image_folder / split / cls).iterdir():
                f.unlink()
            (image_folder / split / cls).rmdir()
    message = run([tiny_config(tmp_path)] + folder_overrides(image_folder))
    assert "1 class(es) (['airplane'])" in message and "validate_with_classifier=false" in message


def test_test_classes_must_match_train_classes(tmp_path, image_folder):
    (image_folder / "test" / "ship").rename(image_folder / "test" / "boat")
    message = run([tiny_config(tmp_path)] + folder_overrides(image_folder))
    assert "has classes ['airplane', 'boat', 'cat']" in message and "must be the same" in message


def test_resume_from_something_that_is_not_a_checkpoint(tmp_path):
    config = tiny_config(tmp_path)
    assert "does not exist" in run([config, "--resume", tmp_path / "nope"])
    (tmp_path / "notckpt").mkdir()
    assert "is not a Determined checkpoint (no state_dict.pth" in run(
        [config, "--resume", tmp_path / "notckpt"]
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "load_data.json").write_text('{"trial_cls_spec": "model_def:MNistTrial"}')
    assert "belongs to 'model_def:MNistTrial', not model_def:BYOLTrial" in run(
        [config, "--resume", other]
    )
    (other / "load_data.json").write_text('{"trial_cls_spec": "model_def:BYOLTrial"}')
    assert "is incomplete" in run([config, "--resume", other])


def test_shipped_configs_parse():
    root = os.path.dirname(model_def.__file__)
    for name, slots in (
        ("const-cifar10.yaml", 1),
        ("distributed-stl10.yaml", 8),
        ("distributed-imagenet.yaml", 64),
    ):
        config = load_config(os.path.join(root, name))
        experiment = parse_experiment_config(config, slots=slots)
        assert config["resources"]["slots_per_trial"] == slots
        hp = experiment.hparams
        assert hp.augmentation.view1.blur_prob == 1.0 and hp.augmentation.view2.solarize_prob == 0.2
        assert experiment.run.searcher.metric in ("holdout_accuracy", "validation_loss")


def test_a_search_must_train_as_long_as_the_searcher_counts():
    path = os.path.join(os.path.dirname(model_def.__file__), "search-cifar10.yaml")
    config = load_config(path, ["hyperparameters.epochs=7"])
    config["hyperparameters"].update(learning_rate=1.0, weight_decay=1e-5, tau_base=0.99)  # sampled
    with pytest.raises(
        ConfigError, match=r"searcher.max_time=100 must equal hyperparameters.epochs=7"
    ):
        parse_experiment_config(config)
    config["hyperparameters"]["epochs"] = 100
    assert parse_experiment_config(config).run.searcher.time_metric == "epochs"


def test_failed_dataset_download_names_the_directory(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "_urlretrieve", no_network)
    message = run([tiny_config(tmp_path)])
    assert (
        "could not download CIFAR10 into data.download_dir=" in message and str(tmp_path) in message
    )


def test_exponent_numbers_without_a_dot_are_numbers():
    """PyYAML reads `1e-5` as a string (YAML 1.1); users mean the number."""
    config = {"hyperparameters": {"weight_decay": 1.0}}
    apply_override(config, "hyperparameters.weight_decay=1e-5")
    raw = yaml.safe_load(
        open(os.path.join(os.path.dirname(model_def.__file__), "const-cifar10.yaml"))
    )["hyperparameters"]
    raw["weight_decay"] = config["hyperparameters"]["weight_decay"]
    assert parse_hparams(raw).weight_decay == 1e-5
    raw["weight_decay"] = "lots"
    with pytest.raises(ConfigError, match="weight_decay='lots' must be a number"):
        parse_hparams(raw)


@pytest.mark.parametrize(
    "where, reason",
    [
        ("under a file", "Not a directory"),
        # Containers run as root, where os.access says yes to everything; /proc refuses mkdir.
        ("/proc/forbidden-dir", "No such file or directory"),
    ],
)
def test_a_checkpoint_dir_that_cannot_be_written_is_refused_before_any_work(
    tmp_path, where, reason
):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    path = not_a_dir / "ckpt" if where == "under a file" else where
    message = run([tiny_config(tmp_path), "--checkpoint-dir", path])
    assert message == f"error: --checkpoint-dir {str(path)!r} is not a writable directory: {reason}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "file"]


def test_a_key_written_twice_is_refused_naming_it_and_its_lines(tmp_path):
    path = tiny_config(tmp_path)
    text = open(path).read().replace("hyperparameters:\n", "hyperparameters:\n  epochs: 7\n", 1)
    open(path, "w").write(text)
    lines = text.splitlines()
    first = lines.index("  epochs: 7") + 1
    second = (
        next(i for i, line in enumerate(lines) if line.startswith("  epochs: ") and i + 1 != first)
        + 1
    )
    assert run([path]) == (
        f"error: config file {str(path)!r}: key 'epochs' appears twice in one mapping: "
        f"lines {first} and {second}"
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_in_strict_mode_is_one_line(tmp_path, image_folder, workers):
    bad = image_folder / "train" / "cat" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    message = run(
        [
            tiny_config(tmp_path),
            *folder_overrides(image_folder),
            "--set",
            "data.strict_images=true",
            "--set",
            f"data.num_workers={workers}",
            "--checkpoint-dir",
            tmp_path / "ckpt",
        ]
    )
    assert len(message.splitlines()) == 1
    assert message.startswith(f"error: {bad}: not a decodable image (")
    assert message.endswith("(data.strict_images is true: fix or remove the image)")
    # Checked before training: not one step, not one checkpoint.
    assert list((tmp_path / "ckpt" / "determined").iterdir()) == []


def test_knn_k_above_the_labeled_images_and_too_many_workers_are_said_once(
    tmp_path, image_folder, caplog
):
    with caplog.at_level("INFO"):
        model_def.main(
            [
                str(tiny_config(tmp_path, knn_k=500)),
                *map(str, folder_overrides(image_folder)),
                "--set",
                "data.num_workers=64",
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
            ]
        )
    said = [r.getMessage() for r in caplog.records if r.name.startswith("byol")]
    cores = len(os.sched_getaffinity(0))
    assert (
        said.count(
            f"data.num_workers=64 is more than the {cores} cores here: using {cores} loader workers"
        )
        == 1
    )
    # 24 training images, 3 held out of the probe's fit: 21 + 3 labeled images for the kNN.
    assert said.count("knn_k=500 is more than the 24 labeled images: the kNN uses all of them") == 1


def test_compile_defaults_to_auto_which_compiles_on_gpus_only(tmp_path):
    raw = load_config(str(tiny_config(tmp_path)))["hyperparameters"]
    raw.pop("compile", None)
    assert parse_hparams(raw).compile == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [device.compiles(s, cpu) for s in ("auto", True, False)] == [False, True, False]
    assert [device.compiles(s, cuda) for s in ("auto", True, False)] == [True, True, False]


def unlabeled_only(tmp_path, **data):
    """const-cifar10.yaml (written for labeled images: validate_with_classifier true, searcher
    on holdout_accuracy) on an image folder given only as data.unlabeled_dir."""
    config = load_config(
        str(tiny_config(tmp_path)),
        ["hyperparameters.dataset_name=image_folder", f"data.unlabeled_dir={tmp_path / 'flat'}"],
    )
    config["data"].update(data)
    return config


def test_without_labels_validation_is_the_byol_loss_and_a_local_run_follows(tmp_path, caplog):
    with caplog.at_level("INFO"):
        local = parse_experiment_config(unlabeled_only(tmp_path), local=True)
    assert local.hparams.validate_with_classifier is False
    assert (local.run.searcher.metric, local.run.searcher.smaller_is_better) == (
        "validation_loss",
        True,
    )
    assert NO_LABELS_SEARCHER in caplog.text
    # On a cluster the master waits for the config's own metric: refused, saying what to set.
    with pytest.raises(ConfigError) as error:
        parse_experiment_config(unlabeled_only(tmp_path))
    assert str(error.value) == f"searcher.metric='holdout_accuracy': {NO_LABELS_SEARCHER}"
    config = unlabeled_only(tmp_path)
    config["searcher"].update(metric="validation_loss", smaller_is_better=True)
    assert parse_experiment_config(config).hparams.validate_with_classifier is False
    # A metric wrong with labels too is refused locally as well.
    config["searcher"].update(metric="test_accuracy", smaller_is_better=False)
    with pytest.raises(ConfigError, match="searcher.metric='test_accuracy': no labeled images"):
        parse_experiment_config(config, local=True)


def test_labeled_folders_keep_the_classifier_and_its_metric(tmp_path, image_folder):
    config = unlabeled_only(
        tmp_path, train_dir=str(image_folder / "train"), test_dir=str(image_folder / "test")
    )
    experiment = parse_experiment_config(config, local=True)
    assert experiment.hparams.validate_with_classifier is True
    assert experiment.run.searcher.metric == "holdout_accuracy"


@pytest.mark.parametrize(
    "data,message",
    [
        (
            {"unlabeled_dir": None},
            "dataset_name=image_folder needs data.train_dir (a <class>/<image> folder), or only "
            "data.unlabeled_dir (images in any layout) to train without labels",
        ),
        ({"train_dir": "/t"}, "dataset_name=image_folder needs data.test_dir"),
        ({"test_dir": "/t"}, "dataset_name=image_folder needs data.train_dir"),
    ],
)
def test_an_image_folder_needs_labeled_pairs_or_unlabeled_images(tmp_path, data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_experiment_config(unlabeled_only(tmp_path, **data), local=True)
