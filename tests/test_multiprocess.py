"""Several processes (torchrun, gloo on CPU) train like one, and a crash during a checkpoint
save leaves the previous checkpoint usable. These start real subprocesses."""

import ast
import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import checkpoint
from config import load_config
from conftest import (
    HANG_GUARD_S,
    ROOT,
    data_dirs,
    folder_overrides,
    run_python,
    tiny_config,
    torchrun,
)
from slots_reference import TOLERANCE, largest_parameter_difference, reference_training

pytestmark = pytest.mark.multiprocess


def run_training(config, checkpoint_dir, folder=None, processes=1, extra=(), env=None):
    """model_def.py in 1 process, or in `processes` under torchrun; on `folder`'s images when
    given (else the config's dataset). Returns the whole log."""
    args = [
        str(config),
        "--checkpoint-dir",
        str(checkpoint_dir),
        *(folder_overrides(folder) if folder is not None else []),
        *extra,
    ]
    if processes == 1:
        command = [sys.executable, "model_def.py", *args]
        base = dict(os.environ, OMP_NUM_THREADS="1")
    else:
        command, base = torchrun(processes, args)
    env = dict(base, **(env or {}))
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def reported(log, kind):
    """{step: metrics} from Determined's report_*_metrics log lines."""
    out = {}
    for m in re.finditer(
        rf"report_{kind}_metrics\(steps_completed=(\d+), metrics=(\{{.*?\}})\)", log
    ):
        out[int(m.group(1))] = ast.literal_eval(m.group(2))
    return out


def checkpoint_weights(checkpoint_dir, step):
    for meta in (checkpoint_dir / "determined").glob("*/metadata.json"):
        if json.loads(meta.read_text())["steps_completed"] == step:
            # Determined's checkpoint holds NumPy's RNG state: checkpoint.load_state allows it.
            return checkpoint.load_state(str(meta.parent / "state_dict.pth"))["models_state_dict"][
                0
            ]
    raise AssertionError(f"no checkpoint of step {step} in {checkpoint_dir}")


def test_two_processes_match_one(tmp_path, image_folder):
    """Each global step sees the same images, views, weights and schedule with 1 or 2 processes;
    only BatchNorm's batch statistics differ (each slot normalises its own share). Each run is
    compared with slots_reference.reference_training, which computes the same in this process:
    the first step's loss to 1e-6, the weights after all 6 steps to slots_reference.TOLERANCE
    (which says why that, and why the two runs cannot equal each other)."""
    config = tiny_config(tmp_path, epochs=2)
    hyperparameters = load_config(str(config))["hyperparameters"]
    one = run_training(config, tmp_path / "one", image_folder, processes=1)
    two = run_training(config, tmp_path / "two", image_folder, processes=2)
    for log, slots, checkpoint_dir in ((one, 1, "one"), (two, 2, "two")):
        losses, weights = reference_training(hyperparameters, image_folder, slots, steps=6)
        loss = {s: m["loss"] for s, m in reported(log, "training").items()}
        assert sorted(loss) == [1, 2, 3, 4, 5, 6]
        assert loss[1] == pytest.approx(losses[0], rel=1e-6), slots
        difference = largest_parameter_difference(
            checkpoint_weights(tmp_path / checkpoint_dir, 6), weights
        )
        assert difference <= TOLERANCE, (slots, difference)
    val_one, val_two = reported(one, "validation"), reported(two, "validation")
    assert sorted(val_one) == sorted(val_two) == [3, 6]
    for step in (3, 6):
        for name in ("test_accuracy", "knn_accuracy"):
            assert 0 <= val_two[step][name] <= 1
    # A 2-process checkpoint resumes in one process.
    checkpoints = {}
    for meta in (tmp_path / "two" / "determined").glob("*/metadata.json"):
        checkpoints[json.loads(meta.read_text())["steps_completed"]] = meta.parent
    run_training(
        config, tmp_path / "resumed", image_folder, extra=["--resume", str(checkpoints[3])]
    )


def test_sync_batchnorm_on_cpu_processes_is_refused(tmp_path, image_folder):
    config = tiny_config(tmp_path, sync_batchnorm=True)
    with pytest.raises(AssertionError, match="sync_batchnorm=true needs GPUs"):
        run_training(config, tmp_path / "ckpt", image_folder, processes=2)


CRASH_ON_SECOND_SAVE = """
import os, signal, sys, torch
sys.argv = sys.argv[1:]
real_save, saves = torch.save, []
def save_then_die_midway(obj, path, *a, **k):
    saves.append(path)
    if len(saves) == 2:
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *a, **k)
torch.save = save_then_die_midway
import runpy
runpy.run_path("model_def.py", run_name="__main__")
"""


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path, image_folder):
    config = tiny_config(tmp_path)
    args = [
        str(config),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--set",
        "hyperparameters.dataset_name=image_folder",
        *data_dirs(image_folder / "train", image_folder / "test"),
        "--set",
        "min_checkpoint_period={batches: 1}",
        "--set",
        "min_validation_period={batches: 100}",
    ]
    result = run_python("-c", CRASH_ON_SECOND_SAVE, "model_def.py", *args)
    assert result.returncode == -signal.SIGKILL
    dirs = list((tmp_path / "ckpt" / "determined").iterdir())
    complete = [d for d in dirs if (d / "byol_checkpoint.json").exists()]
    partial = [d for d in dirs if not (d / "byol_checkpoint.json").exists()]
    assert len(complete) == 1 and len(partial) == 1
    # The cut-off one is refused with a clear message; the previous one resumes to the end.
    refused = run_python("model_def.py", *args, "--resume", partial[0])
    assert refused.returncode != 0 and "is incomplete" in refused.stderr
    log = run_training(
        config, tmp_path / "ckpt2", image_folder, extra=["--resume", str(complete[0])]
    )
    assert 6 in reported(log, "training")


# Points torchvision's CIFAR-10 at the test's HTTP server and the tiny archive's checksums, in
# every process of the run (a sitecustomize on PYTHONPATH).
CIFAR_MIRROR = """
import json, os
if "TEST_CIFAR10" in os.environ:
    from torchvision.datasets import cifar
    spec = json.loads(os.environ["TEST_CIFAR10"])
    cifar.CIFAR10.url, cifar.CIFAR10.tgz_md5 = spec["url"], spec["tgz_md5"]
    cifar.CIFAR10.train_list, cifar.CIFAR10.test_list = spec["train_list"], spec["test_list"]
    cifar.CIFAR10.meta = dict(cifar.CIFAR10.meta, md5=spec["meta_md5"])
"""


@pytest.fixture
def cifar10_mirror(tmp_path):
    """A tiny CIFAR-10 archive in the real format (cifar-10-python.tar.gz) on a loopback HTTP
    server that counts its downloads; yields (env for the runs, the download count)."""
    import hashlib
    import tarfile
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from conftest import write_cifar10

    source, served = tmp_path / "source", tmp_path / "served"
    write_cifar10(str(source), train_count=40, test_count=20)
    served.mkdir()
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = lambda path: hashlib.md5(path.read_bytes()).hexdigest()
    batches = source / "cifar-10-batches-py"
    downloads = []

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            # torchvision first asks for the url to follow redirects, with a "Method: HEAD"
            # header and no interest in the body; the other GETs are downloads.
            if self.headers.get("Method") != "HEAD":
                downloads.append(self.path)
            with contextlib.suppress(ConnectionError):  # the redirect probe hangs up early
                super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CIFAR_MIRROR)
    spec = {
        "url": f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz",
        "tgz_md5": md5(served / "cifar-10-python.tar.gz"),
        "train_list": [[f"data_batch_{i}", md5(batches / f"data_batch_{i}")] for i in range(1, 6)],
        "test_list": [["test_batch", md5(batches / "test_batch")]],
        "meta_md5": md5(batches / "batches.meta"),
    }
    yield {"PYTHONPATH": str(site), "TEST_CIFAR10": json.dumps(spec)}, downloads
    server.shutdown()


def test_two_processes_download_once_and_probe_on_the_chief(tmp_path, cifar10_mirror):
    """On a fresh machine one process downloads CIFAR-10 while the other waits, then opens
    it; validation's features travel to the chief, which alone trains the heads; and the
    validation before the first step (same weights in both runs) gives 1 and 2 processes the
    same metrics."""
    env, downloads = cifar10_mirror
    config = tiny_config(tmp_path, epochs=1, global_batch_size=8)
    extra = ["--set", "perform_initial_validation=true"]
    with open(config) as f:
        text = f.read()
    with open(config, "w") as f:  # perform_initial_validation is not in the shipped config
        f.write(text + "perform_initial_validation: false\n")

    two = run_training(config, tmp_path / "two", processes=2, extra=extra, env=env)
    assert downloads == ["/cifar-10-python.tar.gz"]
    one = run_training(
        config,
        tmp_path / "one",
        processes=1,
        extra=[*extra, "--set", f"data.download_dir={tmp_path / 'downloads-one'}"],
        env=env,
    )
    assert len(downloads) == 2  # the one-process run had its own empty download dir

    probe_lines = re.findall(r"linear probe on rank (\d+)", two)
    validations = reported(two, "validation")
    assert sorted(validations) == [0, 5] and probe_lines == ["0", "0"]
    assert re.findall(r"linear probe on rank (\d+)", one) == ["0", "0"]
    before_training_one, before_training_two = reported(one, "validation")[0], validations[0]
    assert before_training_one.keys() == before_training_two.keys()
    for name, value in before_training_one.items():
        assert before_training_two[name] == pytest.approx(value, abs=1e-6), name
    # Training logs come from the chief alone: one progress line per epoch.
    assert len(re.findall(r"step 5/5  epoch 1/1", two)) == 1


def test_a_corrupt_image_is_logged_once_per_run_whatever_the_workers_and_epochs(
    tmp_path, image_folder
):
    """Two loader workers, two epochs and two validations meet the same corrupt training image:
    it is skipped and counted every time, and logged once."""
    (image_folder / "train" / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    log = run_training(
        tiny_config(tmp_path, epochs=2),
        tmp_path / "ckpt",
        image_folder,
        extra=["--set", "data.num_workers=2"],
    )
    assert log.count("skipping corrupt image") == 1 and "bad.png" in log
    import augment
    import sources

    # Counted each time it is drawn: 3 batches of 8 of the 25 images per epoch.
    names, _, _ = sources.scan_class_folder(str(image_folder / "train"))
    bad = names.index("cat/bad.png")
    drawn = sum(bad in augment.epoch_permutation(0, epoch, 25)[:24] for epoch in (0, 1))
    counted = sum(m["corrupt_images"] for m in reported(log, "training").values())
    assert drawn >= 1 and counted == drawn
