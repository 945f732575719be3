"""The guard against a non-finite training step, without a host sync per step.

As torch.amp.GradScaler does it: each step's finiteness is a flag on the device, a non-finite
step's update (LARS and the EMA) is skipped there, and the first such step is recorded there.
The host reads the record only where it already waits for the device (a progress line, a
metrics report, which comes before every checkpoint) and stops the run with one line.
"""

import math
from typing import List, Optional

import torch

from optim import flat_view


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    def __init__(self, device: torch.device):
        full = lambda value, dtype=torch.float32: torch.full((), value, dtype=dtype, device=device)
        self.first_step = full(-1, torch.int64)  # the first non-finite step; -1: none yet
        self.first_loss = full(math.nan)  # its loss
        self.loss_before = full(math.nan)  # the last finite loss before it (NaN: none)
        self.last_finite_loss = full(math.nan)

    @torch.no_grad()
    def screen(self, loss: torch.Tensor, grads: List[torch.Tensor], step: int) -> torch.Tensor:
        """The step's flag (0-dim bool: loss and every gradient finite), computed on the device.
        A non-finite step's gradients are zeroed, so the skipped update stays finite, and the
        first such step is recorded."""
        views = [flat_view(g) for g in grads]
        flat = torch.cat(views)
        loss = loss.detach()
        finite = torch.isfinite(loss) & torch.isfinite(flat).all()
        torch._foreach_copy_(
            views, torch.where(finite, flat, 0.0).split([v.numel() for v in views])
        )
        first = ~finite & (self.first_step < 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.first_loss = torch.where(first, loss, self.first_loss)
        self.loss_before = torch.where(first, self.last_finite_loss, self.loss_before)
        self.last_finite_loss = torch.where(finite, loss, self.last_finite_loss)
        return finite

    def check(self, batches_per_epoch: int) -> None:
        """Raise NonFiniteLossError if a step was not finite. Reads the device: call it only
        where the host waits for the device anyway."""
        step = int(self.first_step)
        if step < 0:
            return
        before: Optional[float] = float(self.loss_before)
        if math.isnan(before):
            before = None
        raise NonFiniteLossError(
            f"non-finite BYOL loss ({float(self.first_loss)}) at step {step} (epoch "
            f"{step // batches_per_epoch}); last finite loss: {before}. Training stopped before "
            f"this step's update; no checkpoint was written from this state. Lower "
            f"hyperparameters.learning_rate or check the input data."
        )
