"""vitkit: efficient vision-transformer backbones (ViT, HaloNet, LaViT, MobileViT, NesT) in PyTorch."""

from vitkit import tasks  # the task packages also register their models (segmentation, ...)
from vitkit.models import (
    create_model,
    get_model_entry,
    list_families,
    list_models,
    load_checkpoint,
    register_model,
    resolve_data_config,
    save_state_dict,
)
from vitkit.routes import optimize

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_model",
    "get_model_entry",
    "list_families",
    "list_models",
    "load_checkpoint",
    "optimize",
    "register_model",
    "resolve_data_config",
    "save_state_dict",
    "tasks",
]
