"""The BYOL network: online backbone + projector + predictor, and the target (an EMA of the online
backbone + projector). Loss and EMA step are pure functions of tensors (BYOL paper, arXiv
2006.07733, Sections 3.1 and 3.2)."""

import copy
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from backbone import build_backbone
from optim import where_each


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Projector and predictor: Linear -> BatchNorm -> ReLU -> Linear (paper, Section 3.3)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def build_network(hp, pretrained_weights: Optional[str] = None) -> "BYOLNetwork":
    """The network the hyperparameters (config.HParams) name: their backbone at their image
    size, with their projector and predictor sizes; `pretrained_weights` a state dict file for
    the backbone (none: random initialisation)."""
    backbone, feature_dim = build_backbone(
        hp.backbone_name, hp.cifar_stem, hp.augmentation.image_size, pretrained_weights
    )
    return BYOLNetwork(backbone, feature_dim, hp.projector_hidden_dim, hp.projection_dim)


class BYOLNetwork(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int, projection_dim: int):
        super().__init__()
        self.online_backbone = backbone
        self.online_projector = mlp(feature_dim, hidden_dim, projection_dim)
        self.predictor = mlp(projection_dim, hidden_dim, projection_dim)
        # The target starts as a copy of the online network and only ever moves by EMA.
        self.target_backbone = copy.deepcopy(self.online_backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.online_projector).requires_grad_(False)

    def forward(self, views: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`views` holds both augmented views of a batch stacked: [view1; view2].

        Returns (online predictions, target projections, online projections), each [2B, dim].
        Both views go through each network in one call so the GPU sees one large batch."""
        online_projection = self.online_projector(self.online_backbone(views))
        prediction = self.predictor(online_projection)
        with torch.no_grad():
            target_projection = self.target_projector(self.target_backbone(views))
        return prediction, target_projection, online_projection

    def online_parameters(self) -> List[nn.Parameter]:
        return list(self.online_backbone.parameters()) + list(self.online_projector.parameters())

    def target_parameters(self) -> List[nn.Parameter]:
        return list(self.target_backbone.parameters()) + list(self.target_projector.parameters())

    @torch.no_grad()
    def update_target(self, tau: float, apply: Optional[torch.Tensor] = None) -> None:
        ema_update_(self.target_parameters(), self.online_parameters(), tau, apply)


@torch.no_grad()
def ema_update_(
    target: List[torch.Tensor],
    online: List[torch.Tensor],
    tau: float,
    apply: Optional[torch.Tensor] = None,
) -> None:
    """target <- tau * target + (1 - tau) * online, as one fused multi-tensor op. With `apply`
    (a 0-dim bool on the device, never read on the host) the step happens only where it is
    true: otherwise the target moves towards itself, which leaves it exactly as it was."""
    if apply is not None:
        online = where_each(apply, online, target)
    torch._foreach_lerp_(target, online, 1.0 - tau)


def regression_loss(prediction: torch.Tensor, target_projection: torch.Tensor) -> torch.Tensor:
    """Per-sample 2 - 2 cos(prediction, target projection) (paper, Eq. 2); the target is
    treated as a constant (stop-gradient)."""
    p = F.normalize(prediction.float(), dim=-1)
    z = F.normalize(target_projection.detach().float(), dim=-1)
    return 2 - 2 * (p * z).sum(dim=-1)


def byol_loss(prediction: torch.Tensor, target_projection: torch.Tensor) -> torch.Tensor:
    """Symmetrised BYOL loss for stacked views [view1; view2]: the prediction from each view
    regresses the target projection of the other view; mean over the batch."""
    p1, p2 = prediction.chunk(2)
    z1, z2 = target_projection.chunk(2)
    return (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()


@torch.no_grad()
def representation_std(online_projection: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std of L2-normalised projections: about
    1/sqrt(dim) for spread-out representations, falling to 0 when they collapse to a point."""
    z = F.normalize(online_projection.float(), dim=-1)
    return z.std(dim=0).mean()
