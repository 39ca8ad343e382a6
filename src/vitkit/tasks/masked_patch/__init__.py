"""Masked patch prediction: the ViT paper's self-supervision (corrupt patch embeddings, predict mean colours)."""

from vitkit.tasks.masked_patch.model import MaskedPatchViT, corrupt_embeddings, draw_corruption
from vitkit.tasks.masked_patch.task import MaskedPatchTask, masked_patch_loss, mean_colour_classes

__all__ = [
    "MaskedPatchTask",
    "MaskedPatchViT",
    "corrupt_embeddings",
    "draw_corruption",
    "masked_patch_loss",
    "mean_colour_classes",
]
