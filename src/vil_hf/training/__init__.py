"""Training on Accelerate: configs, optimisation, checkpoints and the loop that `scripts/train.py` runs."""

from .checkpoints import list_checkpoints, save_checkpoint
from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .loop import TrainResult, save_final_model, train
from .models import build_image_processor, build_model, load_initial_weights
from .optim import build_optimizer, lr_factor, parameter_groups, set_learning_rate
from .run_folder import RunFolderError, plan_run

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "build_image_processor",
    "build_model",
    "build_optimizer",
    "config_from_dict",
    "list_checkpoints",
    "load_config",
    "load_initial_weights",
    "lr_factor",
    "parameter_groups",
    "RunFolderError",
    "plan_run",
    "save_checkpoint",
    "save_final_model",
    "set_learning_rate",
    "train",
]
