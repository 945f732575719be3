"""The linear probe and kNN that validation and evaluate_result.py share, on features whose
class is planted (one dimension per class): the outcome is known before the probe runs."""

import numpy as np
import torch

import probe
from config import ProbeConfig


def planted_features(per_class: int, seed: int, classes: int = 3, dim: int = 8):
    """Feature c is 3 for images of class c, 0 otherwise, plus noise of 0.1 everywhere."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(per_class)
    features = 0.1 * torch.randn(len(labels), dim, generator=generator)
    features[torch.arange(len(labels)), labels] += 3.0
    return features, labels


# A learning rate too small to move the heads (1e-7) and one that learns (0.1).
SETTINGS = ProbeConfig(
    lrs=(1e-7, 0.1), epochs=20, batch_size=16, holdout_fraction=0.1, knn_k=5, knn_temperature=0.1
)


def test_validation_chooses_the_lr_that_learns_the_planted_class_and_scores_it_perfectly():
    parts = [planted_features(n, seed) for n, seed in ((20, 1), (10, 2), (10, 3))]
    features = torch.cat([f for f, _ in parts])
    labels = torch.cat([y for _, y in parts])
    splits = torch.cat([torch.full_like(y, split) for (_, y), split in zip(parts, (0, 1, 2))])
    metrics = probe.probe_metrics(features, labels, splits, 3, SETTINGS, seed=0)
    assert metrics["classifier_best_lr"] == 0.1
    assert metrics["holdout_accuracy"] == 1.0 and metrics["test_accuracy"] == 1.0
    assert metrics["classifier_lr_1e-07_holdout_accuracy"] < 1.0
    assert metrics["knn_accuracy"] == 1.0


def test_evaluation_chooses_the_same_lr_and_reports_the_same_accuracy():
    (fit_x, fit_y), (held_x, held_y), (test_x, test_y) = (
        planted_features(n, seed) for n, seed in ((20, 1), (10, 2), (10, 3))
    )
    fit_x, held_x, test_x = probe.standardize(fit_x, held_x, test_x)
    heads = probe.train_heads_on_features(fit_x, fit_y, 3, SETTINGS.lrs, 20, 16, seed=0)
    result = probe.score_heads(heads, (held_x, held_y), (test_x, test_y), SETTINGS.lrs, False)
    assert result["chosen_lr"] == 0.1
    assert result["holdout_accuracy"] == 1.0 and result["test_accuracy"] == 1.0


def test_ties_go_to_the_smallest_learning_rate():
    assert probe.chosen_head([0.5, 0.9, 0.9, 0.2]) == 1


def brute_force_knn_accuracy(train_x, train_y, test_x, test_y, classes, k, temperature):
    """Weighted kNN by the definition, one test row at a time: the k train rows of highest
    cosine similarity s vote for their class with weight exp(s / temperature)."""
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    correct = 0
    for row, label in zip(test_x, test_y):
        similarity = train_x @ (row / np.linalg.norm(row))
        nearest = np.argsort(-similarity)[:k]
        votes = np.zeros(classes)
        for i in nearest:
            votes[train_y[i]] += np.exp(similarity[i] / temperature)
        correct += int(np.argmax(votes) == label)
    return correct / len(test_y)


def test_knn_accuracy_equals_a_brute_force_reference_for_each_k_and_temperature():
    """Overlapping classes (centres 1 apart, noise of 1 per dimension), 1,500 test rows so the
    1,024-row chunks split them: the result depends on k and on the temperature."""
    rng = np.random.default_rng(0)
    classes, dim = 5, 8
    centres = rng.normal(size=(classes, dim))
    train_y, test_y = rng.integers(0, classes, 400), rng.integers(0, classes, 1500)
    train_x = (centres[train_y] + rng.normal(size=(400, dim))).astype(np.float32)
    test_x = (centres[test_y] + rng.normal(size=(1500, dim))).astype(np.float32)
    results = {}
    for k in (3, 100):
        for temperature in (0.02, 1.0):
            ours = probe.knn_accuracy(
                torch.from_numpy(train_x),
                torch.from_numpy(train_y),
                torch.from_numpy(test_x),
                torch.from_numpy(test_y),
                classes,
                k=k,
                temperature=temperature,
            )
            expected = brute_force_knn_accuracy(
                train_x.astype(np.float64), train_y, test_x, test_y, classes, k, temperature
            )
            assert ours == expected, (k, temperature)
            results[k, temperature] = ours
    assert results[3, 1.0] != results[100, 1.0] and results[100, 0.02] != results[100, 1.0]
