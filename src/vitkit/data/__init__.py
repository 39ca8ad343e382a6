"""Datasets, transforms and samplers."""

from vitkit.data.sampler import (
    DEFAULT_RESOLUTIONS,
    MultiScaleDataset,
    VariableBatchSampler,
    multiscale_collate,
    resolution_set,
    variable_batch_schedule,
)

__all__ = [
    "DEFAULT_RESOLUTIONS",
    "MultiScaleDataset",
    "VariableBatchSampler",
    "multiscale_collate",
    "resolution_set",
    "variable_batch_schedule",
]
