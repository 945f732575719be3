"""startup-hook.sh installs exactly the pinned packages the image lacks, and nothing else."""

import os
import shutil
import stat
import subprocess
import sys

from conftest import ROOT

# Stands in for python3: runs scripts with the real interpreter and records pip installs.
PYTHON_SHIM = f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> "$PIP_LOG"; exit 0; fi
exec {sys.executable} "$@"
"""


def run_hook(tmp_path, requirements):
    shutil.copy(os.path.join(ROOT, "startup-hook.sh"), tmp_path / "startup-hook.sh")
    (tmp_path / "requirements.txt").write_text(requirements)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "python3"
    shim.write_text(PYTHON_SHIM)
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
        "# pins\ntorch==9.9.9\ndetermined==0.38.1\nPyYAML==6.0.4\n"
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
