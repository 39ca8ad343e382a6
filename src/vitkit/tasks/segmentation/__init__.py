"""Semantic segmentation: the task, VOC/ADE20K data and MNIST canvases, mIoU, and the models (Semantic-FPN on any
backbone, DeepLabv3 on MobileViT)."""

from vitkit.tasks.segmentation import models  # noqa: F401  (registers the segmentation models)
from vitkit.tasks.segmentation.metrics import upsample_logits
from vitkit.tasks.segmentation.task import SegmentationTask

__all__ = ["SegmentationTask", "upsample_logits"]
