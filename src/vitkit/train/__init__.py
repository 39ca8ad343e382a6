"""The training loop for every task: step, loop, optimizer/schedule/EMA, checkpoints, run folders, evaluation."""

from vitkit.config import TrainConfig, load_config
from vitkit.train.engine import Trainer, TrainingAborted, train
from vitkit.train.evaluate import evaluate, linear_probe
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
    "linear_probe",
    "load_config",
    "load_run",
    "predict",
    "train",
]
