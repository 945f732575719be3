#!/usr/bin/env bash
# Determined runs this in every task container before the trial starts. It compares the image's
# packages with requirements.txt: a pin the image lacks, or has older than the `>= X` minimum
# noted beside it, is installed at the pinned version. torch, torchvision and determined are the
# image's own builds (CUDA, the cluster's version) and are never replaced: if one is too old the
# hook stops with one line naming the image to use. Idempotent; prints nothing when all is well,
# as on Determined 0.38.1's default image, where it installs nothing (requirements-compat.txt).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

to_install=$(python3 - <<'PY'
import importlib.metadata as metadata
import re
import sys

from packaging.version import Version

FROM_THE_IMAGE = {"torch", "torchvision", "determined"}
IMAGE = "an image (environment.image) that has it, as Determined's PyTorch images do"
for line in open("requirements.txt"):
    pin, _, note = line.partition("#")
    if not pin.strip():
        continue
    name, version = pin.strip().split("==")
    minimum = re.match(r"\s*>=\s*([\w.]+)", note)
    minimum = Version(minimum.group(1) if minimum else version)
    try:
        have = Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        have = None
    # NGC builds are pre-releases of the version they ship (torch 2.3.0a0+40ec155e58 is NGC
    # 24.03's torch 2.3): compare the release they become.
    if have is not None and Version(have.base_version) >= minimum:
        continue
    if name.lower() in FROM_THE_IMAGE:
        found = f"has {name} {have}" if have else f"lacks {name}"
        sys.exit(f"error: this image {found}; BYOL needs {name} >= {minimum}: use {IMAGE}")
    print(pin.strip())
PY
)

if [ -n "$to_install" ]; then
  # shellcheck disable=SC2086  # one requirement per word
  python3 -m pip install --quiet --no-input --disable-pip-version-check $to_install
fi
