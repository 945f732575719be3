#!/usr/bin/env bash
# Determined runs this in every task container before the trial starts. It installs, at the
# versions pinned in requirements.txt, only the packages the image lacks: Determined's PyTorch
# images bring their own CUDA builds of torch and torchvision and the determined package, which
# must not be replaced. Idempotent; prints nothing when there is nothing to do.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

missing=$(python3 - <<'PY'
import importlib.metadata as metadata
import re

PROVIDED_BY_IMAGE = {"torch", "torchvision", "determined"}
for line in open("requirements.txt"):
    requirement = line.split("#", 1)[0].strip()
    if not requirement:
        continue
    name = re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0]
    if name.lower() in PROVIDED_BY_IMAGE:
        continue
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(requirement)
PY
)

if [ -n "$missing" ]; then
  # shellcheck disable=SC2086  # one requirement per word
  python3 -m pip install --quiet --no-input --disable-pip-version-check $missing
fi
