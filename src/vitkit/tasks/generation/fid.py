"""Frechet distances between generated and real images, on features of our own networks.

FID (Heusel et al., arXiv 1706.08500) fits a Gaussian to the features of each image set and reports
``|mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))``. The usual features come from an ImageNet Inception-v3,
whose weights are not available here, so the numbers of this module are *not* comparable with published FIDs:

* **MNIST-FID**: the pooled features (pre-logits) of a vitkit digit classifier trained on the real MNIST digits
  (``configs/gan_fid_classifier_mnist.yaml``), read from its run folder: :func:`classifier_features`.
* **pixel FD**: without such a classifier, the Frechet distance of 2x2-average-pooled pixels
  (:class:`PixelFeatures`): cheap and always available, but blind to what makes a digit a digit.

The statistics and the distance are torchmetrics' ``FrechetInceptionDistance`` with a custom feature module
(accumulated in float64; ``pip install vitkit[generation]``): a maintained implementation of the formula rather
than our own.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class PixelFeatures(nn.Module):
    """Images ``(B, C, H, W)`` -> their 2x2-average-pooled pixels, flattened: ``(B, C H W / 4)``."""

    def __init__(self, in_chans: int, img_size: tuple[int, int]):
        super().__init__()
        self.num_features = in_chans * (img_size[0] // 2) * (img_size[1] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.float(), 2).flatten(1)


class ClassifierFeatures(nn.Module):
    """Images in [-1, 1] -> a classifier's pooled features before its head (``forward_head(pre_logits=True)``),
    after converting them to the classifier's normalisation."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model.eval()
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.num_features = model.num_features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.float() + 1) / 2 - self.mean) / self.std  # [-1, 1] -> [0, 1] -> the classifier's inputs
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True).float()


def classifier_features(path: str | Path, in_chans: int, img_size: tuple[int, int]) -> ClassifierFeatures:
    """The feature extractor of a classification run folder (its last checkpoint), checked against the images it
    will see (channels and size must be the classifier's own, so no resizing hides a mismatch)."""
    from vitkit.train.inference import load_run  # the loop imports the tasks: imported when used

    run = load_run(path, which="last")
    if run.task.name != "classification":
        raise ValueError(f"task.fid_model={str(path)!r} is a {run.task.name!r} run; it must be a classification run")
    c, h, w = run.data_config["input_size"]
    if (c, h, w) != (in_chans, *img_size):
        raise ValueError(
            f"task.fid_model={str(path)!r} classifies {c}x{h}x{w} images; the gan task makes "
            f"{in_chans}x{img_size[0]}x{img_size[1]}"
        )
    c_mean, c_std = run.data_config["mean"], run.data_config["std"]
    mean = list(c_mean[:c]) if len(c_mean) >= c else list(c_mean) * c
    std = list(c_std[:c]) if len(c_std) >= c else list(c_std) * c
    return ClassifierFeatures(run.model, mean, std)


def frechet_metric(features: nn.Module):
    """A torchmetrics ``FrechetInceptionDistance`` over ``features`` (a module with ``num_features``): ``update(x,
    real=True/False)`` with batches of images, ``compute()`` the distance."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise ImportError(
            "the gan task's Frechet distance needs torchmetrics: pip install 'vitkit[generation]'"
        ) from None
    return FrechetInceptionDistance(feature=features, normalize=False)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, features: nn.Module | None = None) -> float:
    """The Frechet distance between two sets (``(N, ...)`` tensors) on ``features`` (default: the rows themselves,
    flattened)."""
    if features is None:
        features = nn.Flatten()
        features.num_features = real[0].numel()
    metric = frechet_metric(features)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())
