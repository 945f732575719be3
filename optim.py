"""The optimizers (LARS for convolutional networks, AdamW for transformers), their parameter
groups, and the LR and EMA schedules of the BYOL paper (Section 3.2 and Appendix C). Schedules
are pure functions of the step index."""

import math
from typing import Dict, List, Optional

import torch
from torch import nn


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


def is_decayed_weight(module: nn.Module, name: str) -> bool:
    """The weights that multiply a layer's input: those of convolutions and linear layers, and
    an attention block's input projection. They alone get weight decay and LARS trust scaling;
    biases, every normalisation parameter, ViT position embeddings and class tokens, Swin's
    relative-position tables and ConvNeXt's layer scales get neither."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return name == "weight"
    return isinstance(module, nn.MultiheadAttention) and name == "in_proj_weight"


def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two groups: decayed weights (weight decay, LARS trust ratio) and the rest (neither)."""
    adapted, excluded = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                (adapted if is_decayed_weight(module, name) else excluded).append(param)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


# Where the device-side skip's selects run one tensor at a time: a CPU pays for every pass over
# memory and nothing for an op. Elsewhere (a GPU) they run over one concatenation, a few kernel
# launches however many tensors, for two more passes over memory.
PER_TENSOR_DEVICES = ("cpu",)


def per_tensor(tensors: List[torch.Tensor]) -> bool:
    return bool(tensors) and tensors[0].device.type in PER_TENSOR_DEVICES


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in memory order (contiguous or channels_last
    alike), so a list of tensors can be concatenated without one copy per tensor."""
    return t.as_strided((t.numel(),), (1,))


def where_each(
    condition: torch.Tensor, tensors: List[torch.Tensor], others: List[torch.Tensor]
) -> List[torch.Tensor]:
    """[torch.where(condition, t, o)] for two lists of same-layout dense tensors and a 0-dim
    bool `condition` on the device: two concatenations and one select instead of a kernel
    launch per tensor, or a select per tensor where that is cheaper (PER_TENSOR_DEVICES)."""
    if per_tensor(tensors):
        return [torch.where(condition, t, o) for t, o in zip(tensors, others)]
    selected = torch.where(
        condition,
        torch.cat([flat_view(t) for t in tensors]),
        torch.cat([flat_view(o) for o in others]),
    )
    pieces = selected.split([t.numel() for t in tensors])
    return [piece.as_strided(t.shape, t.stride()) for piece, t in zip(pieces, tensors)]


class SkippableOptimizer(torch.optim.Optimizer):
    """An optimizer whose next step can be made conditional on a 0-dim bool device flag
    (apply_only_if), the way torch.amp.GradScaler skips a step with non-finite gradients but
    without reading the flag on the host: the gradients must be finite (zeroed when the flag is
    false), and a false flag leaves weights and optimizer state exactly as they were.
    Subclasses update one parameter group at a time (step_group)."""

    def __init__(self, params, defaults: Dict):
        super().__init__(params, defaults)
        self.finite: Optional[torch.Tensor] = None

    def apply_only_if(self, finite: torch.Tensor) -> None:
        self.finite = finite

    def gradients(self) -> List[torch.Tensor]:
        """The gradients the next step applies (of the parameters that have one)."""
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        finite, self.finite = self.finite, None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self.step_group(group, params, finite)
        return loss

    def step_group(self, group: Dict, params: List[torch.Tensor], finite: Optional[torch.Tensor]):
        raise NotImplementedError


class LARS(SkippableOptimizer):
    """SGD with momentum whose per-tensor update is scaled by the trust ratio
    eta * ||w|| / ||g + wd * w|| (You et al. 2017), as BYOL uses it:

        u = g + wd * w;  u *= eta * ||w|| / ||u||  (unless excluded);  v = m * v + u;  w -= lr * v
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

    def step_group(self, group: Dict, params: List[torch.Tensor], finite: Optional[torch.Tensor]):
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
            return
        # Multiplying by 1.0 is exact, so an applied step has the bits of the plain one; a
        # skipped one keeps v (m -> 1, u -> 0) and moves w by -lr * 0.
        keep = finite.to(params[0].dtype)
        torch._foreach_mul_(updates, keep)
        torch._foreach_mul_(buffers, torch.where(finite, group["momentum"], 1.0))
        torch._foreach_add_(buffers, updates)
        torch._foreach_add_(params, torch._foreach_mul(buffers, keep), alpha=-group["lr"])


class AdamW(SkippableOptimizer):
    """torch.optim.AdamW's update (decoupled weight decay, Loshchilov & Hutter 2019), as DINO
    and the ViT recipes of solo-learn and lightly train transformers. Per parameter p with
    gradient g, at its step t:

        p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def step_group(self, group: Dict, params: List[torch.Tensor], finite: Optional[torch.Tensor]):
        grads = [p.grad for p in params]
        for p in params:
            if not self.state[p]:
                self.state[p] = {
                    "step": torch.zeros((), device=p.device),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
        steps = [self.state[p]["step"] for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        (beta1, beta2), lr = group["betas"], group["lr"]
        # keep is 1 for an applied step (multiplying by 1.0 is exact) and 0 for a skipped
        # one, whose betas become 1 so that the moments stay as they are.
        if finite is None:
            keep, beta1_kept, beta2_kept = 1.0, beta1, beta2
        else:
            keep = finite.to(params[0].dtype)
            beta1_kept, beta2_kept = (
                torch.where(finite, beta1, 1.0),
                torch.where(finite, beta2, 1.0),
            )
        # A list of the one flag: _foreach_add_(tensors, 0-dim tensor) reads it on the host.
        torch._foreach_add_(steps, [keep] * len(steps) if finite is not None else 1.0)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"] * keep)
        torch._foreach_mul_(exp_avgs, beta1_kept)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2_kept)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        # The bias corrections, from each parameter's step count on the device.
        bias_correction2 = torch._foreach_pow(beta2, steps)
        torch._foreach_neg_(bias_correction2)
        torch._foreach_add_(bias_correction2, 1.0)  # 1 - b2^t
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, torch._foreach_sqrt(bias_correction2))
        torch._foreach_add_(denominators, group["eps"])
        step_sizes = torch._foreach_pow(beta1, steps)
        torch._foreach_sub_(step_sizes, 1.0)  # b1^t - 1 = -(1 - b1^t)
        torch._foreach_reciprocal_(step_sizes)
        torch._foreach_mul_(step_sizes, keep * lr)  # -lr / (1 - b1^t), or 0 when skipped
        updates = torch._foreach_div(exp_avgs, denominators)
        torch._foreach_mul_(updates, step_sizes)
        torch._foreach_add_(params, updates)


def build_optimizer(network: nn.Module, hp) -> SkippableOptimizer:
    """hyperparameters.optimizer (config.HParams) on the BYOL network's online part: LARS or
    AdamW, the same two parameter groups either way. The target network is not trained, only
    averaged. Its LR is 0 until the trial sets each step's (learning_rate_at)."""
    groups = parameter_groups(network, hp.weight_decay)
    if hp.optimizer == "lars":
        return LARS(
            groups, lr=0.0, momentum=hp.lars_momentum, trust_coefficient=hp.lars_trust_coefficient
        )
    return AdamW(groups, lr=0.0)
