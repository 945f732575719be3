"""Determined's cross-slot metric reducers: validation's linear probe + kNN, training metrics, and
the fine-tuned classifier's accuracy.

LinearProbeReducer: each slot extracts features of its share of the labeled images; the reducer
gathers every slot's features, orders them by image index (so the result does not depend on how
many slots there were), and computes probe.probe_metrics:
  - holdout_accuracy and test_accuracy: linear heads, one per learning rate, trained on cached
    features of the fit split; the head with the best accuracy on held-out training images
    (holdout_accuracy, what searchers and checkpoint_policy choose by) is scored on the test
    split (test_accuracy, reported only);
  - knn_accuracy: weighted kNN (k, temperature, cosine) of test against labeled train features.
TrainingMetricsReducer: loss and friends summed on the device, averaged at report time.
"""

import logging
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from determined import pytorch

from config import ProbeConfig
from probe import SPLIT_TEST, probe_metrics

logger = logging.getLogger("byol")


class LinearProbeReducer(pytorch.MetricReducer):
    """Collects (feature, label, split, index) of every labeled image across slots on the chief,
    which alone trains the heads and runs the kNN (probe.probe_metrics); the other slots send
    their features and report nothing. Determined's own reduction is an allgather: every slot
    would receive every feature and train every head, so the features travel here instead
    (`distributed.gather`, to the chief only) and the allgather carries nothing but None."""

    def __init__(
        self, num_classes: int, probe: ProbeConfig, seed: int, device: torch.device, distributed
    ):
        self.num_classes, self.probe, self.seed, self.device = num_classes, probe, seed, device
        self.distributed = distributed
        self.said_knn_clipped = False
        self.reset()

    def reset(self) -> None:
        self.parts: List[Tuple[torch.Tensor, ...]] = []
        self.gathered: Optional[List[Tuple[np.ndarray, ...]]] = None

    def update(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        splits: torch.Tensor,
        indices: torch.Tensor,
    ) -> None:
        self.parts.append(
            tuple(t.detach().cpu() for t in (features.float(), labels, splits, indices))
        )

    def per_slot_reduce(self) -> None:
        mine = (
            tuple(torch.cat(column).numpy() for column in zip(*self.parts)) if self.parts else None
        )
        self.gathered = self.distributed.gather(mine)  # a list on the chief, None elsewhere
        return None

    def cross_slot_reduce(self, per_slot: Sequence[None]) -> Dict[str, float]:
        if self.gathered is None:
            return {}
        parts = [p for p in self.gathered if p is not None]
        features, labels, splits, indices = (np.concatenate(column) for column in zip(*parts))
        # Canonical order: by image index, each image once (the loader may pad a slot).
        _, first = np.unique(indices, return_index=True)
        features, labels, splits = (
            torch.from_numpy(t[first]).to(self.device) for t in (features, labels, splits)
        )
        labeled = int((splits != SPLIT_TEST).sum())
        if self.probe.knn_k > labeled and not self.said_knn_clipped:
            self.said_knn_clipped = True
            logger.info(
                "knn_k=%d is more than the %d labeled images: the kNN uses all of them",
                self.probe.knn_k,
                labeled,
            )
        started = time.time()
        metrics = probe_metrics(features, labels, splits, self.num_classes, self.probe, self.seed)
        logger.info(
            "linear probe on rank %d: %d heads and the kNN on %d images in %.1f s",
            self.distributed.rank,
            len(self.probe.lrs),
            len(indices),
            time.time() - started,
        )
        return metrics


class TrainingMetricsReducer(pytorch.MetricReducer):
    """Training metrics summed on the device between reports (no host sync per step), averaged
    across slots at report time, with images/s of the reporting window. The chief warns once
    when the representations collapse (representation_std below the threshold)."""

    def __init__(self, collapse_threshold: float, global_batch_size: int, is_chief: bool):
        self.collapse_threshold, self.global_batch_size = collapse_threshold, global_batch_size
        self.is_chief = is_chief
        self.collapse_warned = False
        self.reset()

    def reset(self) -> None:
        """Determined calls this at the start of every stretch of training between reports."""
        self.window_start = time.time()
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, corrupt_images: torch.Tensor, **means: torch.Tensor) -> None:
        for name, value in means.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.sums["corrupt_images"] = self.sums.get("corrupt_images", 0) + corrupt_images
        self.count += 1

    def per_slot_reduce(self) -> Dict[str, float]:
        out = {name: float(value) for name, value in self.sums.items()}
        out["count"] = self.count
        return out

    def cross_slot_reduce(self, per_slot: Sequence[Dict[str, float]]) -> Dict[str, float]:
        count = sum(p["count"] for p in per_slot)
        if count == 0:
            return {}
        metrics = {
            name: sum(p[name] for p in per_slot) / count
            for name in per_slot[0]
            if name not in ("count", "corrupt_images")
        }
        metrics["corrupt_images"] = sum(p["corrupt_images"] for p in per_slot)
        elapsed = max(1e-9, time.time() - self.window_start)
        metrics["images_per_second"] = per_slot[0]["count"] * self.global_batch_size / elapsed
        collapsing = metrics["representation_std"] < self.collapse_threshold
        if collapsing and self.is_chief and not self.collapse_warned:
            self.collapse_warned = True
            logger.warning(
                "representations may be collapsing: representation_std=%.5f is below %.5f "
                "(about 1/sqrt(projection_dim) when healthy, 0 when collapsed)",
                metrics["representation_std"],
                self.collapse_threshold,
            )
        return metrics


class ClassifierAccuracyReducer(pytorch.MetricReducer):
    """A classifier's accuracy and cross-entropy per split (`split_names`: {split id: name}),
    from every slot's per-image results. Each image counts once: the results are joined by image
    index across slots, since Determined's validation loader may pad a slot's share."""

    def __init__(self, split_names: Dict[int, str]):
        self.split_names = split_names
        self.reset()

    def reset(self) -> None:
        self.parts: List[Tuple[torch.Tensor, ...]] = []

    def update(
        self, indices: torch.Tensor, splits: torch.Tensor, correct: torch.Tensor, loss: torch.Tensor
    ) -> None:
        self.parts.append(tuple(t.detach() for t in (indices, splits, correct, loss.float())))

    def per_slot_reduce(self) -> Optional[Tuple[np.ndarray, ...]]:
        if not self.parts:
            return None
        return tuple(torch.cat(column).cpu().numpy() for column in zip(*self.parts))

    def cross_slot_reduce(self, per_slot: Sequence[Optional[Tuple[np.ndarray, ...]]]):
        parts = [p for p in per_slot if p is not None]
        if not parts:
            return {}
        indices, splits, correct, loss = (np.concatenate(column) for column in zip(*parts))
        _, first = np.unique(indices, return_index=True)
        splits, correct, loss = splits[first], correct[first], loss[first]
        metrics = {}
        for split, name in self.split_names.items():
            mine = splits == split
            if mine.any():
                metrics[f"{name}_accuracy"] = float(correct[mine].mean())
                metrics[f"{name}_images"] = int(mine.sum())
                mean_loss = float(loss[mine].mean())
                if np.isfinite(mean_loss):  # a diverged model's loss is left out, not sent
                    metrics[f"{name}_loss"] = mean_loss
        return metrics
