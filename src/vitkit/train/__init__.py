"""Training engine: config, loop, optimizer/schedule/EMA, checkpoints, distributed, evaluation."""

from vitkit.train.config import TrainConfig, load_config
from vitkit.train.engine import Trainer, TrainingAborted, train
from vitkit.train.evaluate import evaluate

__all__ = ["TrainConfig", "Trainer", "TrainingAborted", "evaluate", "load_config", "train"]
