"""Image classification: the task, its metrics and figures."""

from vitkit.tasks.classification.task import ClassificationTask

__all__ = ["ClassificationTask"]
