"""Object detection: the task, COCO data and MNIST canvases, box operations, COCO mAP, and the detectors
(RetinaNet + FPN on any backbone, SSDLite on MobileViT)."""

from vitkit.tasks.detection import models  # noqa: F401  (registers the detectors)
from vitkit.tasks.detection.models import Detector
from vitkit.tasks.detection.task import DetectionTask

__all__ = ["DetectionTask", "Detector"]
