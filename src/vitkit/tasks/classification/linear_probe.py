"""Few-shot linear evaluation: closed-form regularised least squares from frozen features to {-1, +1} targets.

ViT paper (Dosovitskiy et al., ICLR 2021), section 4.1: "Few-shot accuracies are obtained by solving a regularized
least-squares regression problem that maps the (frozen) representation of a subset of training images to
{-1, 1}^K target vectors." The details follow big_vision's ``evaluators/fewshot_lsr.py`` and
``configs/common_fewshot.py`` (the authors' later code; the paper gives none of them):

* features are whitened per dimension with the mean and standard deviation (+1e-5) of the K-shot training set;
* a constant feature of 100 is appended for the bias, so that it is almost unregularised;
* ``W = (Z^T Z + l2 I)^-1 Z^T T`` with ``l2 = 2 ** 10`` and ``T = 2 * onehot - 1`` (computed as
  ``Z^T (Z Z^T + l2 I)^-1 T`` when there are fewer images than dimensions: the same matrix);
* K images per class drawn at random, the K-shot sets of one seed nested (the 1-shot image is among the 5);
  3 seeds, and the accuracy on every held-out image, averaged over the seeds.

:func:`vitkit.train.evaluate.linear_probe` extracts the features and runs this; ``vitkit eval RUN --linear-probe K``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BIAS_CONSTANT = 100.0
L2_REG = 2.0**10
SEEDS = 3


@dataclass
class LinearProbe:
    """A fitted probe: ``scores(x) = [(x - mean) / std, BIAS_CONSTANT] @ weight``."""

    weight: torch.Tensor  # (D + 1, C), float64
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    def design(self, x: torch.Tensor) -> torch.Tensor:
        """Whitened features with the bias column: ``(N, D + 1)`` float64."""
        z = (x.double() - self.mean) / self.std
        return torch.cat([z, z.new_full((len(z), 1), BIAS_CONSTANT)], dim=1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.design(x) @ self.weight

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x).argmax(1)


def signed_one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets in {-1, +1}: +1 for the label's class, -1 elsewhere; ``(N, C)`` float64."""
    return 2.0 * torch.nn.functional.one_hot(labels.long(), num_classes).double() - 1.0


def fit_least_squares(x: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = L2_REG) -> LinearProbe:
    """The closed-form ridge regression of ``x`` ``(N, D)`` onto {-1, +1} targets (see the module docstring)."""
    if l2 <= 0:
        raise ValueError(f"linear probe: l2 must be > 0, got {l2}")
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-5
    probe = LinearProbe(torch.empty(0), mean, std)
    z, t = probe.design(x), signed_one_hot(labels, num_classes)
    n, d = z.shape
    if n >= d:  # (Z^T Z + l2 I)^-1 Z^T T: a (D+1)-square system
        probe.weight = torch.linalg.solve(z.T @ z + l2 * torch.eye(d, dtype=z.dtype), z.T @ t)
    else:  # Z^T (Z Z^T + l2 I)^-1 T: an N-square system, the same solution (push-through identity)
        probe.weight = z.T @ torch.linalg.solve(z @ z.T + l2 * torch.eye(n, dtype=z.dtype), t)
    return probe


def dataset_labels(dataset) -> np.ndarray:
    """Every image's label, without decoding images where the dataset holds them apart (arrays, folders)."""
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):  # a split: a slice of another dataset
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if hasattr(dataset, "labels"):
        return np.asarray(dataset.labels, dtype=np.int64)
    if hasattr(dataset, "samples"):
        return np.asarray([label for _, label in dataset.samples], dtype=np.int64)
    return np.asarray([dataset[i][1] for i in range(len(dataset))], dtype=np.int64)


def few_shot_indices(labels: np.ndarray, num_classes: int, shots: list[int], seed: int) -> dict[int, np.ndarray]:
    """For each K in ``shots``, K indices of each class drawn with ``seed``: a random order per class, its first K
    (so the sets of one seed are nested). A class with fewer than K images is an error naming it."""
    rng = np.random.default_rng(seed)
    order = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    short = {c: len(o) for c, o in enumerate(order) if len(o) < max(shots)}
    if short:
        k = max(shots)
        raise ValueError(f"linear probe: {k}-shot needs {k} images of every class; these have fewer: {short}")
    return {k: np.concatenate([o[:k] for o in order]) for k in shots}


def probe_accuracies(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    draws: list[dict[int, np.ndarray]],
    l2: float = L2_REG,
) -> dict:
    """Accuracy on ``test`` of a probe fitted to each draw (one per seed: K -> rows of ``train``), per K: the mean
    and standard deviation over the seeds, and each seed's."""
    per_seed: dict[int, list[float]] = {}
    for draw in draws:
        for k, rows in draw.items():
            t = torch.as_tensor(rows, dtype=torch.long)
            probe = fit_least_squares(train_x[t], train_y[t], num_classes, l2)
            per_seed.setdefault(k, []).append((probe.predict(test_x) == test_y).double().mean().item())
    return {
        str(k): {"accuracy": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v} for k, v in per_seed.items()
    }


def write_probe(results: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "linear_probe.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def format_probe(results: dict) -> str:
    head = (
        f"few-shot linear probe ({results['feature_dim']}-d frozen features, least squares with l2={results['l2']:g}, "
        f"{results['seeds']} seed(s)): accuracy on {results['eval_images']} held-out images of {results['classes']} "
        f"classes"
    )
    lines = [head]
    for k, r in results["shots"].items():
        spread = f" ± {r['std']:.4f}" if len(r["per_seed"]) > 1 else ""
        lines.append(f"  {k:>3}-shot  {r['accuracy']:.4f}{spread}")
    return "\n".join(lines)
