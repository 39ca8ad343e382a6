"""Interpretability: attention capture, rollout, attention distance, position-embedding similarity, attention
similarity across layers, CAM / Grad-CAM, NesT's GradCAT, patch-filter PCA, and ``vitkit explain``."""

from vitkit.interpret.attention import (
    AttentionRecord,
    attention_rollout,
    capture_attention,
    mean_attention_distance,
    pos_embed_similarity,
)
from vitkit.interpret.cam import CamResult, GradCatResult, class_activation_map, grad_cam, gradcat, patch_embed_pca
from vitkit.interpret.explain import METHODS, explain
from vitkit.interpret.geometry import ImageQuery, attention_to_image, mean_attention_distance_image
from vitkit.interpret.similarity import (
    CollapseResult,
    attention_collapse,
    attention_similarity,
    attention_similarity_matrix,
    plot_attention_collapse,
)

__all__ = [
    "METHODS",
    "AttentionRecord",
    "CollapseResult",
    "CamResult",
    "GradCatResult",
    "ImageQuery",
    "class_activation_map",
    "explain",
    "grad_cam",
    "gradcat",
    "patch_embed_pca",
    "attention_rollout",
    "attention_to_image",
    "attention_collapse",
    "attention_similarity",
    "attention_similarity_matrix",
    "capture_attention",
    "mean_attention_distance",
    "mean_attention_distance_image",
    "plot_attention_collapse",
    "pos_embed_similarity",
]
