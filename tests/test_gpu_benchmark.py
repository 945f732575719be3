"""benchmarks/gpu.py, the one prepared GPU run, checked on the CPU as CI can (`--device cpu
--smoke`): every measure it takes on a GPU is taken, tiny, and lands in its JSON file, and the
compiled trials compile as on a GPU: one graph for the augmentation and one for the network of
each trial (CIFAR arrays and ImageNet's loader crops), without a break or a recompile."""

import json
import math
import os
import subprocess
import sys

import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURES = {
    "augmentation ms",
    "train_batch ms",
    "train_batch, views given, ms",
    "bare eager step ms",
    "train_batch / bare",
    "training images/s",
    "epoch of 16 images, s",
    "peak memory measured, GiB",
    "peak memory estimated, GiB",
    "validation images/s",
    "ImageNet-size train_batch images/s, CPU-decoded crops given",
    "ImageNet-size train_batch images/s, JPEGs decoded in the step",
    "ImageNet-size peak memory measured, GiB",
    "ImageNet-size peak memory estimated, GiB",
}


def test_the_gpu_benchmark_runs_every_measure_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["device"] == "CPU" and record["smoke"] is True
    assert record["compile backend"] == "eager"
    off, on = record["results"]["compile false"], record["results"]["compile true"]
    assert set(off) == MEASURES
    assert set(on) == MEASURES | {"dynamo graphs", "dynamo graph breaks", "dynamo recompiles"}
    assert (on["dynamo graphs"], on["dynamo graph breaks"], on["dynamo recompiles"]) == (4, 0, 0)
    for column in (off, on):
        for name, value in column.items():
            if "measured" in name:
                assert value is None, name  # a CPU has no allocator peak to read
            elif not name.startswith("dynamo"):
                assert math.isfinite(value) and value > 0, (name, value)
    # The estimate is memory.py's for the trial's own hyperparameters: a larger network at 224
    # px (ResNet-50, 4 images) needs more than ResNet-18 at 32 px (8 images).
    assert off["ImageNet-size peak memory estimated, GiB"] > off["peak memory estimated, GiB"]
    # torchvision 0.19 (PR 8496) made decode_jpeg take a list; the cluster image's 0.18 does not.
    takes_list = tuple(int(v) for v in torchvision.__version__.split(".")[:2]) >= (0, 19)
    expected = "batched" if takes_list else "one call per image"
    assert record["decoding"]["CPU JPEG decode calls"] == expected
    assert record["decoding"]["CPU JPEG decode images/s"] > 0
    # On the CPU the package's decode is libjpeg-turbo's own: the same pixels.
    assert record["decoding"]["CPU decode vs CPU libjpeg-turbo, largest |difference|"] == 0
    assert "wrote " + str(out) in result.stdout
