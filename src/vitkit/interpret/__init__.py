"""Interpretability: attention capture, rollout, attention distance, position-embedding similarity, and
attention similarity across layers (CAM, GradCAT and the `vitkit explain` command are still to come)."""

from vitkit.interpret.attention import (
    AttentionRecord,
    attention_rollout,
    capture_attention,
    mean_attention_distance,
    pos_embed_similarity,
)
from vitkit.interpret.similarity import attention_similarity

__all__ = [
    "AttentionRecord",
    "attention_rollout",
    "attention_similarity",
    "capture_attention",
    "mean_attention_distance",
    "pos_embed_similarity",
]
