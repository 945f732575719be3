"""LARS, its parameter groups, and the LR and EMA schedules of the BYOL paper (Section 3.2 and
Appendix C). Schedules are pure functions of the step index."""

import math
from typing import Dict, List, Optional

import torch
from torch import nn

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def learning_rate_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine decay to 0 at
    `total_steps`: peak * 1/2 * (1 + cos(pi * progress))."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_tau_at(step: int, total_steps: int, tau_base: float) -> float:
    """tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2, rising from tau_base to 1."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def lars_param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two groups: weights get weight decay and LARS trust-ratio scaling; every bias and every
    normalisation parameter (ResNet and downsample BN, the MLP BNs) gets neither."""
    adapted, excluded = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, NORM_LAYERS) or name == "bias":
                excluded.append(param)
            else:
                adapted.append(param)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in memory order (contiguous or channels_last
    alike), so a list of tensors can be concatenated without one copy per tensor."""
    return t.as_strided((t.numel(),), (1,))


def where_each(
    condition: torch.Tensor, tensors: List[torch.Tensor], others: List[torch.Tensor]
) -> List[torch.Tensor]:
    """[torch.where(condition, t, o)] for two lists of same-layout dense tensors and a 0-dim
    bool `condition` on the device: two concatenations and one select, instead of a kernel
    launch per tensor."""
    selected = torch.where(
        condition,
        torch.cat([flat_view(t) for t in tensors]),
        torch.cat([flat_view(o) for o in others]),
    )
    pieces = selected.split([t.numel() for t in tensors])
    return [piece.as_strided(t.shape, t.stride()) for piece, t in zip(pieces, tensors)]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor update is scaled by the trust ratio
    eta * ||w|| / ||g + wd * w|| (You et al. 2017), as BYOL uses it:

        u = g + wd * w;  u *= eta * ||w|| / ||u||  (unless excluded);  v = m * v + u;  w -= lr * v

    apply_only_if(finite) makes the next step conditional on a 0-dim bool device flag, the way
    torch.amp.GradScaler skips a step with non-finite gradients but without reading the flag
    on the host: the gradients must be finite (zeroed when the flag is false), and a false
    flag leaves weights and momentum exactly as they were.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            lars_exclude=False,
        )
        super().__init__(params, defaults)
        self.finite: Optional[torch.Tensor] = None

    def apply_only_if(self, finite: torch.Tensor) -> None:
        self.finite = finite

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        finite, self.finite = self.finite, None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            if group["weight_decay"]:
                updates = torch._foreach_add(updates, params, alpha=group["weight_decay"])
            if not group["lars_exclude"]:
                param_norms = torch.stack(torch._foreach_norm(params))
                update_norms = torch.stack(torch._foreach_norm(updates))
                trust = torch.where(
                    (param_norms > 0) & (update_norms > 0),
                    group["trust_coefficient"] * param_norms / update_norms,
                    torch.ones_like(param_norms),
                )
                updates = torch._foreach_mul(updates, trust.unbind())
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            if finite is None:
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, updates)
                torch._foreach_add_(params, buffers, alpha=-group["lr"])
                continue
            # Multiplying by 1.0 is exact, so an applied step has the bits of the plain one; a
            # skipped one keeps v (m -> 1, u -> 0) and moves w by -lr * 0.
            keep = finite.to(params[0].dtype)
            torch._foreach_mul_(updates, keep)
            torch._foreach_mul_(buffers, torch.where(finite, group["momentum"], 1.0))
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, torch._foreach_mul(buffers, keep), alpha=-group["lr"])
        return loss
