"""Model families, the registry and the builder."""

from vitkit.models import axial, deepvit, halonet, lavit, mobilevit, nest, pvt, swin, vit, vit_hybrid  # noqa: F401  (registers the models)
from vitkit.models._base import FeatureInfo, ModelArgError, VitkitModel, feature_take_indices
from vitkit.models._builder import create_model
from vitkit.models._checkpoint import load_checkpoint, read_state_dict, save_state_dict
from vitkit.models._registry import (
    PretrainedCfg,
    get_model_entry,
    list_families,
    list_models,
    register_model,
    resolve_data_config,
)

__all__ = [
    "FeatureInfo",
    "ModelArgError",
    "PretrainedCfg",
    "VitkitModel",
    "create_model",
    "feature_take_indices",
    "get_model_entry",
    "list_families",
    "list_models",
    "load_checkpoint",
    "read_state_dict",
    "register_model",
    "resolve_data_config",
    "save_state_dict",
]
