"""The one training loop: optimizer and schedules, checkpoints with exact resume, callbacks, loggers.

from lmforge.training import Trainer, TrainConfig
state = Trainer(model, objective, batches, config=TrainConfig(max_steps=2000), eval_data=val,
                run_dir="runs/x").fit()
"""

from . import distributed
from .callbacks import (
    Callback,
    EarlyStopping,
    JSONLLogger,
    ProgressBar,
    TensorBoardLogger,
    TimeBudget,
    WandbLogger,
)
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint, seed_everything
from .config import TrainConfig
from .loop import Trainer, TrainingDiverged, TrainState, default_num_targets
from .optim import build_optimizer, lr_at, param_groups

__all__ = [
    "Callback",
    "EarlyStopping",
    "JSONLLogger",
    "ProgressBar",
    "TensorBoardLogger",
    "TimeBudget",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "WandbLogger",
    "build_optimizer",
    "distributed",
    "default_num_targets",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "lr_at",
    "param_groups",
    "save_checkpoint",
    "seed_everything",
]
