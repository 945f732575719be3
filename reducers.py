"""Determined's cross-slot metric reducers: validation's linear probe + kNN, and training metrics.

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
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from determined import pytorch

from probe import probe_metrics
from utils import ProbeConfig, format_duration

logger = logging.getLogger("byol")


class LinearProbeReducer(pytorch.MetricReducer):
    """Collects (feature, label, split, index) of every labeled image across slots and turns
    them into probe.probe_metrics on the chief."""

    def __init__(self, num_classes: int, probe: ProbeConfig, seed: int, device: torch.device):
        self.num_classes, self.probe, self.seed, self.device = num_classes, probe, seed, device
        self.reset()

    def reset(self) -> None:
        self.parts: List[Tuple[torch.Tensor, ...]] = []

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

    def per_slot_reduce(self) -> Tuple[np.ndarray, ...]:
        if not self.parts:
            return (np.zeros((0, 0), np.float32),) + (np.zeros(0, np.int64),) * 3
        return tuple(torch.cat(column).numpy() for column in zip(*self.parts))

    def cross_slot_reduce(self, per_slot: Sequence[Tuple[np.ndarray, ...]]) -> Dict[str, float]:
        per_slot = [p for p in per_slot if len(p[3])]
        features, labels, splits, indices = (np.concatenate(column) for column in zip(*per_slot))
        # Canonical order: by image index, each image once (the loader may pad a slot).
        _, first = np.unique(indices, return_index=True)
        features, labels, splits = (
            torch.from_numpy(t[first]).to(self.device) for t in (features, labels, splits)
        )
        return probe_metrics(features, labels, splits, self.num_classes, self.probe, self.seed)


class TrainingMetricsReducer(pytorch.MetricReducer):
    """Training metrics summed on the device between reports (no host sync per step), reduced
    across slots at report time. Also prints progress (images/s, ETA) and warns once when the
    representations collapse (representation_std below the threshold)."""

    def __init__(self, collapse_threshold: float, total_steps: int, global_batch_size: int):
        self.collapse_threshold, self.total_steps, self.global_batch_size = (
            collapse_threshold,
            total_steps,
            global_batch_size,
        )
        self.steps_done = 0
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
        self.report_progress(per_slot[0]["count"], metrics, time.time())
        return metrics

    def report_progress(self, steps: int, metrics: Dict[str, float], now: float) -> None:
        self.steps_done += steps
        elapsed = max(1e-9, now - self.window_start)
        images_per_s = steps * self.global_batch_size / elapsed
        eta = (self.total_steps - self.steps_done) * elapsed / max(1, steps)
        logger.info(
            "step %d/%d (%.1f%%)  loss %.4f  repr std %.4f  %.0f images/s  ETA %s",
            self.steps_done,
            self.total_steps,
            100 * self.steps_done / max(1, self.total_steps),
            metrics["loss"],
            metrics["representation_std"],
            images_per_s,
            format_duration(eta),
        )
        metrics["images_per_second"] = images_per_s
        if metrics["representation_std"] < self.collapse_threshold and not self.collapse_warned:
            self.collapse_warned = True
            logger.warning(
                "representations may be collapsing: representation_std=%.5f is below %.5f "
                "(about 1/sqrt(projection_dim) when healthy, 0 when collapsed)",
                metrics["representation_std"],
                self.collapse_threshold,
            )
