"""How a batch meets the device: precision, memory format and normalised network inputs.

One home for the rules that the trial (model_def.py) and the evaluation (linear_eval.py)
share, so that features in training and in evaluation come out of the same pipeline.
"""

import contextlib
import logging
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from config import ConfigError

logger = logging.getLogger("byol")


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """hyperparameters.precision: bf16 autocast when asked, or on a GPU for `auto`; else None
    (fp32)."""
    return (
        torch.bfloat16
        if precision == "bf16" or (precision == "auto" and device.type == "cuda")
        else None
    )


def compiles(setting: Union[bool, str], device: torch.device) -> bool:
    """hyperparameters.compile: true, false, or auto: compiled on a GPU, where fusing the many
    small kernels of a step saves their launches; eager on a CPU, where compiling takes
    minutes and saves little."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def augments_in_loader(setting: str, device: torch.device) -> bool:
    """hyperparameters.augment_on: loader, device, or auto: on a GPU the device makes the
    views (batched, in a few kernels); on a CPU the loader workers do, beside the training
    process rather than in its way."""
    return setting == "loader" or (setting == "auto" and device.type != "cuda")


def compiled_if(compiles: bool, fn: Callable, what: str) -> Callable:
    """`fn` through torch.compile (CompiledOrEager) when `compiles`, else `fn` itself."""
    return CompiledOrEager(fn, what) if compiles else fn


class CompiledOrEager:
    """`fn` through torch.compile; if compiling fails, one log line and `fn` eager from then
    on (the run goes on, slower)."""

    def __init__(self, fn: Callable, what: str):
        self.eager, self.what = fn, what
        self.compiled: Optional[Callable] = torch.compile(fn)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as error:
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                logger.warning("compile: %s falls back to eager: %s", self.what, first_line)
                self.compiled = None
        return self.eager(*args)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> Iterator[None]:
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        yield


def uses_channels_last(device: torch.device, backbone_name: str) -> bool:
    """Convolutional networks on a GPU are faster in channels_last (NHWC); a CPU gains
    nothing, and a transformer's patch tokens are reshaped out of it at once."""
    from backbone import is_convolutional

    return device.type == "cuda" and is_convolutional(backbone_name)


def memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class Normalize:
    """uint8 (or 0-255 float) images [B, 3, H, W] -> normalised float network input, in the
    network's memory format. The statistics are copied to the device once."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        channels_last: bool = False,
    ):
        self.device, self.channels_last = device, channels_last
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float() / 255.0
        return memory_format((x - self.mean) / self.std, self.channels_last)


def resolve(name: Optional[str]) -> torch.device:
    """--device: the named device, or CUDA when there is one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def batch_loader(
    dataset, batch_sampler, num_workers: int, device: torch.device, loader_class: Any = None
):
    """A DataLoader of batches: each a list of items of `batch_sampler` made whole by
    `dataset.collate`, pinned on a GPU machine so that the copy to the device is asynchronous,
    by workers kept between epochs. `loader_class`: torch's DataLoader, or Determined's for a
    trial (pytorch.DataLoader, which the trial's controller builds into torch's)."""
    return (loader_class or torch.utils.data.DataLoader)(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=dataset.collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
