"""Interpretability tools (attention similarity across layers; more land with the interpretability issue)."""

from vitkit.interpret.similarity import attention_similarity

__all__ = ["attention_similarity"]
