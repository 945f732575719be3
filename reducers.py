"""Cross-slot metric reducers: the in-training linear probe and kNN.

Each slot extracts features of its share of the labeled images; the reducer gathers every slot's
features on the chief, orders them by image index (so the result does not depend on how many
slots there were), and computes:
  - holdout_accuracy and test_accuracy: linear heads, one per learning rate, trained on cached
    features of the fit split; the head with the best accuracy on held-out training images
    (holdout_accuracy, what searchers and checkpoint_policy choose by) is scored on the test
    split (test_accuracy, reported only);
  - knn_accuracy: weighted kNN (k, temperature, cosine) of test against labeled train features.
"""
import logging
import math
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from determined import pytorch
from torch import nn

from data import SPLIT_FIT, SPLIT_HOLDOUT, SPLIT_TEST

logger = logging.getLogger("byol")


class LinearHeads(nn.Module):
    """Several linear classifiers on the same features, one per learning rate, trained together
    with SGD (Nesterov momentum 0.9) and a cosine LR decay."""

    def __init__(self, feature_dim: int, num_classes: int, lrs: Sequence[float], seed: int):
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.heads = nn.ModuleList(nn.Linear(feature_dim, num_classes) for _ in lrs)
        torch.random.set_rng_state(generator_state)
        self.lrs = list(lrs)
        self.optimizer = torch.optim.SGD(
            [{"params": h.parameters(), "lr": lr} for h, lr in zip(self.heads, lrs)],
            momentum=0.9,
            nesterov=True,
        )

    def set_progress(self, progress: float) -> None:
        scale = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr * scale

    def train_step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        loss = sum(F.cross_entropy(head(features), labels) for head in self.heads)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def correct(self, features: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
        """Number of top-k correct predictions per head: [num_heads]."""
        out = []
        for head in self.heads:
            top = head(features).topk(min(k, head.out_features), dim=1).indices
            out.append((top == labels[:, None]).any(dim=1).sum())
        return torch.stack(out)


def train_heads_on_features(
    fit_features: torch.Tensor,
    fit_labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    epochs: int,
    batch_size: int,
    seed: int,
) -> LinearHeads:
    """Trains the heads on cached features, shuffled with a seeded generator. Determined runs
    validation under no_grad; the heads need gradients."""
    with torch.enable_grad():
        return _train_heads(fit_features, fit_labels, num_classes, lrs, epochs, batch_size, seed)


def _train_heads(fit_features, fit_labels, num_classes, lrs, epochs, batch_size, seed) -> LinearHeads:
    heads = LinearHeads(fit_features.shape[1], num_classes, lrs, seed).to(fit_features.device)
    generator = torch.Generator().manual_seed(seed)
    n = len(fit_features)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(fit_features.device)
        for i in range(steps_per_epoch):
            heads.set_progress((epoch * steps_per_epoch + i) / total)
            idx = order[i * batch_size : (i + 1) * batch_size]
            heads.train_step(fit_features[idx], fit_labels[idx])
    return heads


def standardization(train: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the fit split's features."""
    return train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)


def standardize(train: torch.Tensor, *others: torch.Tensor) -> List[torch.Tensor]:
    """Scale features by the train split's mean/std: an invertible affine map, so the probe is
    still linear in the backbone features, but SGD is far less sensitive to the LR."""
    mean, std = standardization(train)
    return [(t - mean) / std for t in (train, *others)]


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> float:
    """Weighted kNN (Wu et al. 2018): each of the k most cosine-similar train features votes for
    its class with weight exp(similarity / temperature)."""
    train = F.normalize(train_features, dim=1)
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test_features), chunk):
        test = F.normalize(test_features[start : start + chunk], dim=1)
        sims, idx = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(test), num_classes, device=test.device)
        votes.scatter_add_(1, train_labels[idx], torch.exp(sims / temperature))
        correct += (votes.argmax(dim=1) == test_labels[start : start + chunk]).sum().item()
    return correct / max(1, len(test_features))


def linear_probe_metrics(
    features: torch.Tensor,
    labels: torch.Tensor,
    splits: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    epochs: int,
    batch_size: int,
    seed: int,
) -> Dict[str, float]:
    fit, held, test = (splits == s for s in (SPLIT_FIT, SPLIT_HOLDOUT, SPLIT_TEST))
    fit_x, held_x, test_x = standardize(features[fit], features[held], features[test])
    heads = train_heads_on_features(fit_x, labels[fit], num_classes, lrs, epochs, batch_size, seed)
    held_acc = heads.correct(held_x, labels[held]).float() / max(1, int(held.sum()))
    test_acc = heads.correct(test_x, labels[test]).float() / max(1, int(test.sum()))
    best = int(torch.argmax(held_acc))  # ties go to the smallest LR
    metrics = {
        "holdout_accuracy": float(held_acc[best]),
        "test_accuracy": float(test_acc[best]),
        "classifier_best_lr": float(lrs[best]),
    }
    for lr, h, t in zip(lrs, held_acc.tolist(), test_acc.tolist()):
        metrics[f"classifier_lr_{lr:g}_holdout_accuracy"] = h
        metrics[f"classifier_lr_{lr:g}_test_accuracy"] = t
    return metrics


class LinearProbeReducer(pytorch.MetricReducer):
    """Collects (feature, label, split, index) of every labeled image across slots and turns
    them into test_accuracy, knn_accuracy and per-LR classifier accuracies."""

    def __init__(self, num_classes: int, lrs: Sequence[float], epochs: int, batch_size: int,
                 knn_k: int, knn_temperature: float, seed: int, device: torch.device):
        self.num_classes, self.lrs, self.epochs, self.batch_size = num_classes, list(lrs), epochs, batch_size
        self.knn_k, self.knn_temperature, self.seed, self.device = knn_k, knn_temperature, seed, device
        self.reset()

    def reset(self) -> None:
        self.parts: List[Tuple[torch.Tensor, ...]] = []

    def update(self, features: torch.Tensor, labels: torch.Tensor, splits: torch.Tensor, indices: torch.Tensor) -> None:
        self.parts.append(tuple(t.detach().cpu() for t in (features.float(), labels, splits, indices)))

    def per_slot_reduce(self) -> Tuple[np.ndarray, ...]:
        if not self.parts:
            return (np.zeros((0, 0), np.float32),) + (np.zeros(0, np.int64),) * 3
        return tuple(torch.cat(column).numpy() for column in zip(*self.parts))

    def cross_slot_reduce(self, per_slot: Sequence[Tuple[np.ndarray, ...]]) -> Dict[str, float]:
        per_slot = [p for p in per_slot if len(p[3])]
        features, labels, splits, indices = (
            torch.from_numpy(np.concatenate(column)) for column in zip(*per_slot)
        )
        # Canonical order: by image index, each image once (the loader may pad a slot).
        indices, first = np.unique(indices.numpy(), return_index=True)
        first = torch.from_numpy(first)
        features, labels, splits = features[first].to(self.device), labels[first].to(self.device), splits[first].to(self.device)
        metrics = linear_probe_metrics(
            features, labels, splits, self.num_classes, self.lrs, self.epochs, self.batch_size, self.seed
        )
        labeled = splits != SPLIT_TEST
        metrics["knn_accuracy"] = knn_accuracy(
            features[labeled], labels[labeled], features[~labeled], labels[~labeled],
            self.num_classes, self.knn_k, self.knn_temperature,
        )
        return metrics


class TrainingMetricsReducer(pytorch.MetricReducer):
    """Training metrics summed on the device between reports (no host sync per step), reduced
    across slots at report time. Also prints progress (images/s, ETA) and warns once when the
    representations collapse (representation_std below the threshold)."""

    def __init__(self, collapse_threshold: float, total_steps: int, global_batch_size: int):
        self.collapse_threshold, self.total_steps, self.global_batch_size = collapse_threshold, total_steps, global_batch_size
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
            self.steps_done, self.total_steps, 100 * self.steps_done / max(1, self.total_steps),
            metrics["loss"], metrics["representation_std"], images_per_s, format_duration(eta),
        )
        metrics["images_per_second"] = images_per_s
        if metrics["representation_std"] < self.collapse_threshold and not self.collapse_warned:
            self.collapse_warned = True
            logger.warning(
                "representations may be collapsing: representation_std=%.5f is below %.5f "
                "(about 1/sqrt(projection_dim) when healthy, 0 when collapsed)",
                metrics["representation_std"], self.collapse_threshold,
            )


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m{rem % 60:02d}s"
