"""The training loop for every task: step, loop, optimizer/schedule/EMA, checkpoints, run folders, evaluation."""

from vitkit.config import TrainConfig, load_config
from vitkit.train.engine import Trainer, TrainingAborted, train
from vitkit.train.evaluate import evaluate
from vitkit.train.inference import LoadedRun, load_run, predict
from vitkit.train.step import StepResult, TrainStep

__all__ = [
    "LoadedRun",
    "StepResult",
    "TrainConfig",
    "TrainStep",
    "Trainer",
    "TrainingAborted",
    "evaluate",
    "load_config",
    "load_run",
    "predict",
    "train",
]
