"""Training: the options (`config`), the loop (`trainer`), checkpoints and the end-of-run report."""

from deepmoe.train.config import TrainConfig, lr_at
from deepmoe.train.trainer import RunStart, TrainingError, TrainingObserver, TrainResult, resume, train

__all__ = ["RunStart", "TrainConfig", "TrainResult", "TrainingError", "TrainingObserver", "lr_at", "resume", "train"]
