"""How a batch meets the device: precision, memory format and normalised network inputs.

One home for the rules that the trial (model_def.py) and the evaluation (linear_eval.py)
share, so that features in training and in evaluation come out of the same pipeline.
"""

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from config import ConfigError


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """hyperparameters.precision: bf16 autocast when asked, or on a GPU for `auto`; else None
    (fp32)."""
    return (
        torch.bfloat16
        if precision == "bf16" or (precision == "auto" and device.type == "cuda")
        else None
    )


@contextlib.contextmanager
def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> Iterator[None]:
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        yield


def uses_channels_last(device: torch.device) -> bool:
    """Convolutions on a GPU are faster in channels_last (NHWC); a CPU gains nothing."""
    return device.type == "cuda"


def memory_format(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if uses_channels_last(device) else x


class Normalize:
    """uint8 (or 0-255 float) images [B, 3, H, W] -> normalised float network input, in the
    device's memory format. The statistics are copied to the device once."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float() / 255.0
        return memory_format((x - self.mean) / self.std, self.device)


def resolve(name: Optional[str]) -> torch.device:
    """--device: the named device, or CUDA when there is one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(name)
