"""startup-hook.sh installs the pins an image lacks or has too old, never replaces the image's
torch, torchvision or determined, and says which image to use when those are too old."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import HANG_GUARD_S, ROOT

# Stands in for python3: runs scripts with the image's interpreter and records pip installs.
PYTHON_SHIM = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> "$PIP_LOG"; exit 0; fi
exec {python} "$@"
"""


def run_hook(tmp_path, requirements, python=sys.executable):
    shutil.copy(os.path.join(ROOT, "startup-hook.sh"), tmp_path / "startup-hook.sh")
    (tmp_path / "requirements.txt").write_text(requirements)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "python3"
    shim.write_text(PYTHON_SHIM.format(python=python))
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(
        os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PIP_LOG=str(tmp_path / "pip.log")
    )
    result = subprocess.run(
        ["bash", str(tmp_path / "startup-hook.sh")],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
    )
    pip_log = (tmp_path / "pip.log").read_text() if (tmp_path / "pip.log").exists() else ""
    return result, pip_log


def test_installs_only_missing_pins_and_never_the_images_torch(tmp_path):
    result, pip_log = run_hook(
        tmp_path,
        "# pins\ntorch==9.9.9  # >= 2.3\ndetermined==0.38.1\nPyYAML==6.0.4  # >= 5.1\n"
        "surely-not-installed-package==1.2.3  # comment\n",
    )
    assert result.returncode == 0, result.stderr
    assert pip_log.split() == [
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-input",
        "--disable-pip-version-check",
        "surely-not-installed-package==1.2.3",
    ]
    assert result.stdout == "" and result.stderr == ""


def test_nothing_to_do_is_silent(tmp_path):
    result, pip_log = run_hook(tmp_path, open(os.path.join(ROOT, "requirements.txt")).read())
    assert result.returncode == 0 and pip_log == "" and result.stdout == "" and result.stderr == ""


def image_python(root, real, versions):
    """The interpreter of a Python environment like a Determined image's: the `real` packages
    installed from the package index (packaging is one: every Determined image has it) and, for
    each of `versions`, only the package's metadata (the hook reads nothing else; a real torch
    of another release is not installable here)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True)
    (site,) = (root / "env" / "lib").glob("python3*/site-packages")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site)]
        + real,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    if installed.returncode != 0:
        pytest.skip(f"cannot install {real} from the package index: {installed.stderr[-300:]}")
    for name, version in versions.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return str(root / "env" / "bin" / "python")


@pytest.fixture(scope="module")
def older_image(tmp_path_factory):
    """An older Determined image: a real numpy 1.26.4 and torch 2.1's package metadata."""
    root = tmp_path_factory.mktemp("older-image")
    return image_python(root, ["numpy==1.26.4", "packaging==26.0"], {"torch": "2.1.0"})


# The packages of Determined 0.38.1's default image, determinedai/pytorch-ngc:0.38.1, that
# requirements.txt names, as the image reports them (spelled as their wheels' metadata does).
# NGC 24.03 (nvcr.io/nvidia/pytorch:24.03-py3): torch, torchvision, numpy, tensorboard, PyYAML.
# determined-ai/environments' Dockerfile-pytorch-ngc then installs determined's dependencies
# (google-cloud-storage unpinned: a 2.x release in 2024; 2.18.2 stands for it) and Pillow>=8.3.2,<=9.5.0
# and matplotlib, unpinned as determined's dependency is (dockerfile_scripts/additional-
# requirements.txt; 3.9.4 stands for it); the master's task-setup.sh installs the determined
# wheel of the cluster before the startup hook runs.
DEFAULT_IMAGE = {
    "torch": "2.3.0a0+40ec155e58.nv24.3",
    "torchvision": "0.18.0a0",
    "numpy": "1.24.4",
    "tensorboard": "2.9.0",
    "PyYAML": "6.0.1",
    "google-cloud-storage": "2.18.2",
    "Pillow": "9.5.0",
    "matplotlib": "3.9.4",
    "determined": "0.38.1",
}


def test_determineds_default_image_needs_nothing_and_hears_nothing(tmp_path):
    python = image_python(tmp_path, ["packaging==26.0"], DEFAULT_IMAGE)
    result, pip_log = run_hook(
        tmp_path, open(os.path.join(ROOT, "requirements.txt")).read(), python
    )
    assert (result.returncode, pip_log, result.stdout, result.stderr) == (0, "", "", "")


def test_a_pre_release_counts_as_the_release_it_becomes(tmp_path):
    """An NGC torch 2.3.0a0 meets `>= 2.3`; a 2.2 build of any kind does not."""
    python = image_python(tmp_path, ["packaging==26.0"], {"torch": "2.2.0a0+81ea7a4"})
    result, pip_log = run_hook(tmp_path, "torch==2.14.1  # >= 2.3\n", python)
    assert result.returncode != 0 and pip_log == ""
    assert result.stderr.startswith(
        "error: this image has torch 2.2.0a0+81ea7a4; BYOL needs torch >= 2.3:"
    )
    result, pip_log = run_hook(tmp_path, "torch==2.14.1  # >= 2.2\n", python)
    assert (result.returncode, pip_log, result.stdout, result.stderr) == (0, "", "", "")


def test_an_older_numpy_is_upgraded_to_the_pin(tmp_path, older_image):
    python = str(older_image)
    version = subprocess.run(
        [python, "-c", "import numpy; print(numpy.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == "1.26.4"
    result, pip_log = run_hook(
        tmp_path, "numpy==2.4.6  # >= 2.0\nPyYAML==6.0.4  # >= 5.1\n", python
    )
    assert result.returncode == 0, result.stderr
    assert pip_log.split()[-2:] == ["numpy==2.4.6", "PyYAML==6.0.4"]  # too old, and missing


def test_a_too_old_torch_stops_with_one_line_naming_the_image(tmp_path, older_image):
    requirements = open(os.path.join(ROOT, "requirements.txt")).read()
    result, pip_log = run_hook(tmp_path, requirements, str(older_image))
    assert result.returncode != 0 and pip_log == "" and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: this image has torch 2.1.0; BYOL needs torch >= 2.3: use an image "
        "(environment.image) that has it, as Determined's PyTorch images do"
    ]
