"""The linear probe and the kNN classifier on frozen features.

Used during training (reducers.LinearProbeReducer, on features of the validation images) and by
the offline evaluation (linear_eval.py): both train, score and choose heads here. Features are standardised with the fit split's mean/std (an invertible
affine map: the probe stays linear in the backbone features, and SGD is far less sensitive to the
learning rate); one linear head per learning rate is trained on the same batches; the LR is
chosen on held-out training images.
"""

import math
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import data
import sources
from config import ProbeConfig

SPLIT_FIT, SPLIT_HOLDOUT, SPLIT_TEST = 0, 1, 2


def labeled_parts(labeled, test, holdout_fraction: float, seed: int) -> List[Tuple[Any, int]]:
    """[(images, split id)] the probe validates on: the labeled training images it fits on,
    the ones it holds out to choose its LR (data.holdout_split), and the test images."""
    fit, held = data.holdout_split(labeled.labels, holdout_fraction, seed)
    return [
        (sources.Subset(labeled, fit), SPLIT_FIT),
        (sources.Subset(labeled, held), SPLIT_HOLDOUT),
        (test, SPLIT_TEST),
    ]


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

    @torch.no_grad()
    def predictions(self, features: torch.Tensor, head: int) -> torch.Tensor:
        """One head's class for each row: its top-1, as `correct` counts it."""
        return self.heads[head](features).topk(1, dim=1).indices[:, 0]


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


def _train_heads(
    fit_features, fit_labels, num_classes, lrs, epochs, batch_size, seed
) -> LinearHeads:
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
def cosine_neighbours(
    bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 1024
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k rows of `bank` most cosine-similar to each query, most similar first:
    (similarities [Q, k], bank row indices [Q, k]); queries go `chunk` at a time, so the
    similarity matrix is never [Q, len(bank)] whole. The one similarity of the kNN accuracy
    and of the neighbour pictures (pictures.py)."""
    bank = F.normalize(bank, dim=1)
    k = min(k, len(bank))
    found = [
        (F.normalize(queries[start : start + chunk], dim=1) @ bank.T).topk(k, dim=1)
        for start in range(0, len(queries), chunk)
    ]
    if not found:
        return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.int64, device=queries.device)
    return torch.cat([s for s, _ in found]), torch.cat([i for _, i in found])


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
    sims, idx = cosine_neighbours(train_features, test_features, k, chunk)
    correct = 0
    for start in range(0, len(test_features), chunk):
        rows = slice(start, start + chunk)
        votes = torch.zeros(len(idx[rows]), num_classes, device=test_features.device)
        votes.scatter_add_(1, train_labels[idx[rows]], torch.exp(sims[rows] / temperature))
        correct += (votes.argmax(dim=1) == test_labels[rows]).sum().item()
    return correct / max(1, len(test_features))


def chosen_head(holdout_accuracies: Sequence[float]) -> int:
    """The head (learning rate) with the best held-out accuracy; ties go to the first, the
    smallest LR."""
    return max(range(len(holdout_accuracies)), key=lambda i: (holdout_accuracies[i], -i))


def score_heads(
    heads: LinearHeads,
    held: Tuple[torch.Tensor, torch.Tensor],
    test: Tuple[torch.Tensor, torch.Tensor],
    lrs: Sequence[float],
    top5: bool = False,
) -> Dict[str, Any]:
    """Per-LR held-out and test accuracy (top-5 too when asked), and the head whose held-out
    accuracy is best (chosen_head): the one rule of both validation and linear_eval.py."""
    accuracy = lambda split, k: (
        heads.correct(split[0], split[1], k=k).float() / max(1, len(split[1]))
    ).tolist()
    held_top1, test_top1 = accuracy(held, 1), accuracy(test, 1)
    test_top5 = accuracy(test, 5) if top5 else None
    best = chosen_head(held_top1)
    classifiers = []
    for i, lr in enumerate(lrs):
        row = {"lr": lr, "holdout_accuracy": held_top1[i], "test_accuracy": test_top1[i]}
        if top5:
            row["test_top5_accuracy"] = test_top5[i]
        classifiers.append(row)
    result = {
        "classifiers": classifiers,
        "chosen_lr": lrs[best],
        "holdout_accuracy": held_top1[best],
        "test_accuracy": test_top1[best],
    }
    if top5:
        result["test_top5_accuracy"] = test_top5[best]
    return result


def flat_metrics(result: Dict[str, Any]) -> Dict[str, float]:
    """score_heads' result as flat metrics, named as validation reports them to Determined."""
    metrics = {
        "test_accuracy": result["test_accuracy"],
        "holdout_accuracy": result["holdout_accuracy"],
        "classifier_best_lr": result["chosen_lr"],
    }
    for name in ("test_top5_accuracy", "knn_accuracy"):
        if name in result:
            metrics[name] = result[name]
    for row in result["classifiers"]:
        for name in ("holdout_accuracy", "test_accuracy", "test_top5_accuracy"):
            if name in row:
                metrics[f"classifier_lr_{row['lr']:g}_{name}"] = row[name]
    return metrics


def probe_metrics(
    features: torch.Tensor,
    labels: torch.Tensor,
    splits: torch.Tensor,
    num_classes: int,
    probe: ProbeConfig,
    seed: int,
) -> Dict[str, float]:
    """Validation's metrics from the features of the fit, held-out and test images (`splits`
    holds each image's SPLIT_*): the linear probe's held-out and test accuracy for the LR chosen
    on held-out images, every LR's accuracies, and the kNN accuracy of test against the labeled
    training images."""
    fit, held, test = (splits == s for s in (SPLIT_FIT, SPLIT_HOLDOUT, SPLIT_TEST))
    fit_x, held_x, test_x = standardize(features[fit], features[held], features[test])
    heads = train_heads_on_features(
        fit_x, labels[fit], num_classes, probe.lrs, probe.epochs, probe.batch_size, seed
    )
    scores = score_heads(heads, (held_x, labels[held]), (test_x, labels[test]), probe.lrs)
    metrics = flat_metrics(scores)
    labeled = splits != SPLIT_TEST
    metrics["knn_accuracy"] = knn_accuracy(
        features[labeled],
        labels[labeled],
        features[test],
        labels[test],
        num_classes,
        probe.knn_k,
        probe.knn_temperature,
    )
    return metrics
