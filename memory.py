"""The peak GPU memory of one BYOL training step, estimated without a GPU.

The trial's network (online and target backbone, projector, predictor) and optimizer are built
as the trial builds them, their tensors replaced by fake tensors (torch's FakeTensorMode:
shapes and dtypes, no memory). Two training steps then run on both views of one per-GPU batch,
with bf16 autocast where the trial would use it: forward, BYOL loss, backward, optimizer step,
EMA. The fake tensors are CPU tensors (autograd cannot run fake CUDA tensors without a GPU), so
autocast is the CPU's, which casts the same layers as CUDA's does: convolutions and matrix
products in bf16, normalisations and the loss in fp32.
Every tensor storage made is counted from its creation until Python frees it, so the peak is
that of live tensors: weights, gradients, optimizer state, activations saved for backward.
Not counted: CUDA's own context and the caching allocator's fragmentation (a real run
reserves more than it allocates), the augmentation's temporaries (freed before the forward),
and the input batch in uint8.
"""

import weakref
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import byol
import optim
from config import HParams


class LiveStorages(TorchDispatchMode):
    """Bytes of the tensor storages alive now and at most, counting each storage once, from
    the op (or `track` call) that made it until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = weakref.WeakSet()

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.tracked:
            return
        self.tracked.add(storage)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


def _to_fake(module: nn.Module, mode, device: str) -> None:
    """Each parameter and buffer of `module` replaced by a fake tensor like it on `device`."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                with mode:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=device)
                m._parameters[name] = nn.Parameter(fake, requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                with mode:
                    m._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)


def two_training_steps(
    hp: HParams, network: byol.BYOLNetwork, per_gpu_batch: int, autocast: Optional[torch.dtype]
) -> None:
    """Two steps of `network` on both views of `per_gpu_batch` images, as the trial takes them:
    forward under autocast, BYOL loss, backward, the family's optimizer, EMA. The second step
    has the optimizer's state from the first."""
    optimizer = optim.build_optimizer(network, hp)
    size = hp.augmentation.image_size
    views = torch.empty(2 * per_gpu_batch, 3, size, size).uniform_(-2, 2)
    for _ in range(2):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            prediction, target_projection, _ = network(views)
            loss = byol.byol_loss(prediction, target_projection)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        network.update_target(0.99)
        del prediction, target_projection, loss


def step_peak_bytes(hp: HParams, per_gpu_batch: int, autocast: Optional[torch.dtype]) -> int:
    """Peak bytes of live tensors in a training step of `hp` at `per_gpu_batch` images."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    network = byol.build_network(hp)
    mode = FakeTensorMode()
    _to_fake(network, mode, "cpu")
    counter = LiveStorages()
    with mode, counter:
        for tensor in [*network.parameters(), *network.buffers()]:
            counter.track(tensor)
        two_training_steps(hp, network, per_gpu_batch, autocast)
    return counter.peak


# What a real run takes beyond its live tensors: CUDA's context and the caching allocator's
# slack (real CPU steps in tests/test_memory.py took up to 1.4x the estimate).
CUDA_RESERVE_BYTES = 1 << 30
GPU_MEMORY_UNITS = {"GB": 1 << 30, "GiB": 1 << 30, "MB": 1 << 20, "MiB": 1 << 20}


def parse_gpu_memory(text: str) -> int:
    """'80GB' -> bytes. GB and GiB both mean 2**30 bytes, as GPU makers count ('80GB' H100)."""
    for unit, scale in GPU_MEMORY_UNITS.items():
        number = text[: -len(unit)].strip()
        if text.endswith(unit) and number.replace(".", "", 1).isdigit() and float(number) > 0:
            return int(float(number) * scale)
    raise ValueError(f"--gpu-memory {text!r}: give the GPU's memory as a number and GB, e.g. 80GB")


def fits(peak: int, gpu_bytes: int) -> bool:
    return peak + CUDA_RESERVE_BYTES <= gpu_bytes


def largest_fitting_batch(
    hp: HParams, per_gpu_batch: int, peak: int, autocast, gpu_bytes: int
) -> int:
    """The largest per-GPU batch below `per_gpu_batch` (whose estimate is `peak`) that fits:
    the peak is close to affine in the batch, so a line through two estimates proposes it,
    and estimates step it down until one fits. 0 if not even 2 images fit."""
    half = max(2, per_gpu_batch // 2)
    peak_half = step_peak_bytes(hp, half, autocast)
    per_image = max(1.0, (peak - peak_half) / max(1, per_gpu_batch - half))
    batch = int((gpu_bytes - CUDA_RESERVE_BYTES - (peak_half - per_image * half)) / per_image)
    batch = min(per_gpu_batch - 1, batch)
    while batch >= 2 and not fits(step_peak_bytes(hp, batch, autocast), gpu_bytes):
        batch = int(batch * 0.9)
    return batch if batch >= 2 else 0
