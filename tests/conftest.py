"""Tiny datasets in the real on-disk formats, and a helper that runs the real training command."""

import contextlib
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torchvision
import yaml
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CLASSES = ["airplane", "cat", "ship"]

# The bound on a test's subprocess: only a hung one reaches it, however slow or shared the
# machine (a test never measures speed with it).
HANG_GUARD_S = 600


def synthetic_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A class-dependent colour blob on noise, so a probe can tell classes apart a little."""
    image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    c = size // 2
    r = size // 4
    image[c - r : c + r, c - r : c + r, label % 3] = 230
    return image


def photo_like(seed: int, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] with a photograph's statistics: a 1/f amplitude spectrum (natural images'),
    correlated colour channels, and a few sharp-edged shapes (occlusions)."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amplitude = 1 / np.maximum(np.hypot(fy, fx), 1 / max(height, width))
    planes = []
    for _ in range(3):
        phase = np.exp(2j * np.pi * rng.random(amplitude.shape))
        planes.append(np.fft.irfft2(amplitude * phase, s=(height, width)))
    pixels = np.stack(planes, -1) @ rng.uniform(0.2, 1.0, (3, 3))
    for _ in range(6):
        y0, x0 = rng.integers(0, height - 8), rng.integers(0, width - 8)
        h, w = rng.integers(8, height // 3), rng.integers(8, width // 3)
        pixels[y0 : y0 + h, x0 : x0 + w] = rng.normal(0, pixels.std(), 3)
    pixels = (pixels - pixels.mean()) / pixels.std()
    return np.clip(128 + 45 * pixels, 0, 255).astype(np.uint8)


def write_image_folder(root, flat: bool = False):
    """train/<class>/*.png (8 per class) and test/<class>/*.png (4 per class), 16 px. `flat`:
    each image one colour (its class's hue, its own shade), which every crop-and-resize keeps
    exactly, whatever its filter and rounding."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 4)):
        for label, cls in enumerate(CLASSES):
            os.makedirs(root / split / cls)
            for i in range(count):
                pixels = synthetic_image(rng, label, 16)
                if flat:
                    pixels[:] = pixels[4:12, 4:12].reshape(-1, 3).mean(axis=0) + 3 * i
                Image.fromarray(pixels).save(root / split / cls / f"{i:03d}.png")
    return root


def run_python(*args, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    """`python ARGS...` in a process of its own (this interpreter), as a user runs a command;
    its output captured as text."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(processes: int, script_args):
    """(command, environment) that start `python model_def.py SCRIPT_ARGS` in `processes`
    processes on this machine as torchrun does, with gloo on CPU. Every port is a free one, so
    that two test runs on one machine never meet: torchrun's and Determined's ZMQ ports
    (INTER_TRAIN_PROCESS_COMM_PORT_1/2, fixed at 12360 and up by default)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "model_def.py",
        *map(str, script_args),
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        USE_TORCH_DISTRIBUTED="1",
        INTER_TRAIN_PROCESS_COMM_PORT_1=str(free_port()),
        INTER_TRAIN_PROCESS_COMM_PORT_2=str(free_port()),
    )
    return command, env


class FakeClock:
    """Time that moves only when someone waits: retries, deadlines and progress timers run at
    once and the same on any machine, however slow or shared. monotonic() and sleep() as the
    time module has them; `sleeps` records every wait."""

    def __init__(self, start: float = 1000.0):
        self.now = start
        self.sleeps = []
        self.lock = threading.Lock()

    def monotonic(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(seconds)
            self.now += seconds

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def write_planted_folder(root, per_class):
    """<class>/*.png whose whole area carries the class: channel c bright (200-255) for class
    c, the others dark (0-60), so every crop of every image shows it."""
    rng = np.random.default_rng(5)
    for label, cls in enumerate(CLASSES):
        os.makedirs(root / cls)
        for i in range(per_class):
            image = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            image[..., label] = rng.integers(200, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(image).save(root / cls / f"{i:03d}.png")
    return root


@contextlib.contextmanager
def talking_to(gcs_server, monkeypatch):
    """The real google-cloud-storage client pointed at a FakeGCS (tests/gcs_server.py), with no
    queued faults and fast retries that wait on a FakeClock, shared with the proxy's timed
    faults. Yields the clock."""
    import gcs

    clock = FakeClock()
    monkeypatch.setattr(gcs, "RETRY_CLOCK", clock)
    monkeypatch.setattr(gcs_server.proxy, "clock", clock)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.host)
    # gcs_client() sets this with os.environ.setdefault; set here, it is undone after the test.
    monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "1")
    monkeypatch.setattr(gcs, "GCS_RETRY_BASE_S", 0.001)
    monkeypatch.setattr(gcs, "GCS_RETRY_CAP_S", 0.01)
    gcs_server.proxy.latency_s = 0.0
    gcs_server.proxy.clear()
    yield clock
    gcs_server.proxy.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (CI=true) every test must run: a skip there (a missing ../shared, a clone
    without the history a test needs, an unreachable package index) is a failure."""
    outcome = yield
    report = outcome.get_result()
    needs_a_gpu = item.get_closest_marker("gpu") is not None  # CI has none (pytest.ini)
    if (
        os.environ.get("CI") == "true"
        and report.skipped
        and not hasattr(report, "wasxfail")
        and not needs_a_gpu
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


@pytest.fixture(autouse=True, scope="session")
def determined_config_dir(tmp_path_factory):
    """Determined's SDK keeps login tokens in its config dir (~/.config/determined): point it
    into a temp dir, so that no test writes into the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DET_DEBUG_CONFIG_PATH", str(tmp_path_factory.mktemp("determined-config")))
        yield


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path)


@pytest.fixture
def no_md5(monkeypatch):
    """Our tiny CIFAR-10/STL-10 files cannot match the real archives' md5 sums."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", lambda *a, **k: True)


def write_cifar10(root, train_count=40, test_count=20):
    """cifar-10-batches-py/ with pickled batches, exactly as the real archive lays them out.
    Returns what was written: {"train" (the 5 batches in order), "test": (uint8 [N, 32, 32, 3]
    images, int labels [N])}."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(
            {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072}, f, protocol=2
        )
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {"train": ([], []), "test": ([], [])}
    for name in files:
        count = test_count if name == "test_batch" else train_count // 5
        labels = [int(v) for v in rng.integers(0, 10, count)]
        images = np.stack([synthetic_image(rng, label, 32) for label in labels])
        # Rows are channel-major 3072-byte vectors (R plane, G plane, B plane).
        rows = images.transpose(0, 3, 1, 2).reshape(count, 3072)
        with open(os.path.join(folder, name), "wb") as f:
            # The real files are Python 2 pickles whose str keys load as str with latin1.
            pickle.dump(
                {
                    "batch_label": name,
                    "labels": labels,
                    "data": rows,
                    "filenames": [f"{i}.png" for i in range(count)],
                },
                f,
                protocol=2,
            )
        split = written["test" if name == "test_batch" else "train"]
        split[0].append(images)
        split[1].extend(labels)
    return {
        k: (np.concatenate(images), np.array(labels)) for k, (images, labels) in written.items()
    }


def write_stl10(root, train_count=10, unlabeled_count=12, test_count=10):
    """stl10_binary/*.bin: uint8 images stored column-major [N, 3, 96, 96], labels 1-based.
    Returns what was written: {split: (uint8 [N, 96, 96, 3] images, 0-based labels [N])}."""
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(2)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    written = {}
    for split, count, labeled in (
        ("train", train_count, True),
        ("unlabeled", unlabeled_count, False),
        ("test", test_count, True),
    ):
        labels = rng.integers(0, 10, count)
        images = np.stack([synthetic_image(rng, int(label), 96) for label in labels])
        images.transpose(0, 3, 2, 1).astype(np.uint8).tofile(os.path.join(folder, f"{split}_X.bin"))
        if labeled:
            (labels + 1).astype(np.uint8).tofile(os.path.join(folder, f"{split}_y.bin"))
        written[split] = (images, labels)
    return written


def train_images(source, strict: bool = False):
    """BYOL's training dataset over `source`, 16-px views, seed 0 (data.TrainImages)."""
    import augment
    import data
    from config import _parse_augmentation, _Reader

    aug = _parse_augmentation(_Reader({"image_size": 16}, "augmentation"))
    return data.TrainImages(
        source,
        augment.TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1)),
        seed=0,
        corrupt_log=data.CorruptImageLog(strict),
    )


def data_dirs(train_dir=None, test_dir=None):
    """`--set` arguments that point data.train_dir and data.test_dir elsewhere."""
    return [
        *(["--set", f"data.train_dir={train_dir}"] if train_dir is not None else []),
        *(["--set", f"data.test_dir={test_dir}"] if test_dir is not None else []),
    ]


def folder_overrides(folder):
    """`--set` arguments that train on an image folder written by write_image_folder."""
    return [
        "--set",
        "hyperparameters.dataset_name=image_folder",
        "--set",
        f"data.train_dir={folder / 'train'}",
        "--set",
        f"data.test_dir={folder / 'test'}",
    ]


# How a refused backbone name is answered: the families, as a user reads them (backbone.py).
KNOWN_FAMILIES = (
    "a torchvision classifier of the families ResNet (resnet*/wide_resnet*/resnext*), RegNet "
    "(regnet_*), EfficientNet (efficientnet_*), ConvNeXt (convnext_*), ViT (vit_*), Swin "
    "(swin_*), or vit_s_16 / vit_ti_16"
)


def tiny_config(tmp_path, **hparams):
    """const-cifar10.yaml shrunk to seconds on a CPU, written to tmp_path/config.yaml."""
    with open(os.path.join(ROOT, "const-cifar10.yaml")) as f:
        config = yaml.safe_load(f)
    config["hyperparameters"].update(
        backbone_name="resnet18",
        global_batch_size=8,
        epochs=2,
        warmup_epochs=1,
        projector_hidden_dim=32,
        projection_dim=16,
        classifier_train_epochs=3,
        classifier_batch_size=8,
        knn_k=5,
    )
    config["hyperparameters"]["augmentation"]["image_size"] = 16
    config["hyperparameters"].update(hparams)
    config["data"].update(download_dir=str(tmp_path / "downloads"), num_workers=0)
    config["min_validation_period"] = {"epochs": 1}
    config["min_checkpoint_period"] = {"epochs": 1}
    config["scheduling_unit"] = 1
    path = tmp_path / "config.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def tiny_finetune_config(tmp_path, folder, **hparams):
    """finetune-cifar10.yaml shrunk to seconds on a CPU (random init unless told), on an image
    folder with train/ and test/, validated and checkpointed every epoch."""
    with open(os.path.join(ROOT, "finetune-cifar10.yaml")) as f:
        config = yaml.safe_load(f)
    config["hyperparameters"].update(
        dataset_name="image_folder",
        backbone_name="resnet18",
        cifar_stem=False,
        image_size=16,
        global_batch_size=8,
        epochs=1,
        label_fraction=1.0,
        holdout_fraction=0.25,
    )
    config["hyperparameters"].update(hparams)
    config["data"].update(
        train_dir=str(folder / "train"),
        test_dir=str(folder / "test"),
        download_dir=str(tmp_path / "downloads"),
        num_workers=0,
    )
    config["min_validation_period"] = {"epochs": 1}
    config["min_checkpoint_period"] = {"epochs": 1}
    config["scheduling_unit"] = 1
    return config


def train_tiny_run(root, *args, **hparams):
    """The real training command (tiny_config, 1 epoch unless told: 3 steps) on a tiny image
    folder written under `root`, run from the package's directory as a user runs it
    (Determined copies the working dir into checkpoints). `args` go to the command line.
    Returns SimpleNamespace(root, folder, config, checkpoint, uuid) of its one checkpoint."""
    import model_def

    folder = write_image_folder(root / "images")
    config = tiny_config(root, **dict({"epochs": 1}, **hparams))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        model_def.main(
            [
                str(config),
                "--checkpoint-dir",
                str(root / "ckpt"),
                *map(str, folder_overrides(folder)),
            ]
            + [str(a) for a in args]
        )
    finally:
        os.chdir(cwd)
    (uuid,) = os.listdir(root / "ckpt" / "determined")
    return SimpleNamespace(
        root=root,
        folder=folder,
        config=config,
        checkpoint=root / "ckpt" / "determined" / uuid,
        uuid=uuid,
    )


def checkpoints_by_step(checkpoint_dir):
    """{steps_completed: [checkpoint dirs]} of a local run's --checkpoint-dir."""
    out = {}
    base = checkpoint_dir / "determined"
    for uuid in os.listdir(base) if base.exists() else []:
        meta = base / uuid / "metadata.json"
        if meta.exists():
            out.setdefault(json.loads(meta.read_text())["steps_completed"], []).append(base / uuid)
    return out


def load_state(path):
    """A checkpoint directory's state_dict.pth."""
    import checkpoint

    return checkpoint.load_state(str(path / "state_dict.pth"))


def assert_same_training_state(a_dir, b_dir):
    """Two checkpoints hold the same training state, bit for bit: every model tensor (weights,
    BatchNorm statistics), every optimizer state tensor, every parameter group's learning rate."""
    import torch

    a, b = load_state(a_dir), load_state(b_dir)
    assert a["models_state_dict"][0].keys() == b["models_state_dict"][0].keys()
    for name, tensor in a["models_state_dict"][0].items():
        assert torch.equal(tensor, b["models_state_dict"][0][name]), (a_dir, name)
    a_opt, b_opt = a["optimizers_state_dict"][0], b["optimizers_state_dict"][0]
    assert a_opt["state"].keys() == b_opt["state"].keys()
    for key, x in a_opt["state"].items():  # LARS's momentum; AdamW's moments and step count
        assert x.keys() == b_opt["state"][key].keys()
        for name, tensor in x.items():
            assert torch.equal(tensor, b_opt["state"][key][name]), (a_dir, key, name)
    assert [g["lr"] for g in a_opt["param_groups"]] == [g["lr"] for g in b_opt["param_groups"]]


def fetch_commit_if_missing(repo, commit):
    """A shallow clone (CI's usual checkout) lacks old commits: fetch the whole history, or
    that one commit from origin, instead of skipping the test that needs it."""

    def present():
        return (
            subprocess.run(
                ["git", "-C", str(repo), "cat-file", "-e", f"{commit}^{{commit}}"],
                capture_output=True,
            ).returncode
            == 0
        )

    if present():
        return
    shallow = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--is-shallow-repository"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    fetch = ["--unshallow", "origin"] if shallow == "true" else ["origin", commit]
    fetched = subprocess.run(
        ["git", "-C", str(repo), "fetch", "--quiet", *fetch],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert present(), (
        f"commit {commit} is not in {repo}'s history and `git fetch {' '.join(fetch)}` did not "
        f"bring it: {fetched.stderr.strip()[-500:]}"
    )


def assert_trains_and_validates_at_step_3(config, checkpoint_dir, caplog):
    """model_def's command on `config` (24 images, batch 8: 3 steps), which must report a
    validation with test_accuracy at step 3."""
    import model_def

    with caplog.at_level("INFO"):
        model_def.main([str(config), "--checkpoint-dir", str(checkpoint_dir)])
    reported = [
        r.getMessage()
        for r in caplog.records
        if "report_validation_metrics(steps_completed=3" in r.getMessage()
    ]
    assert reported and "test_accuracy" in reported[0]
