"""Training: the MuonClip optimizer (muon.py) and the pretraining/SFT pipeline behind `k25 train`."""

from .muon import MuonClip, build_optimizer, newton_schulz, qk_clip_layer, set_max_logit_recording, split_params
from .schedule import lr_factor
from .trainer import TrainConfig, Trainer, TrainError, read_metrics, train

__all__ = [
    "MuonClip", "build_optimizer", "newton_schulz", "qk_clip_layer", "set_max_logit_recording", "split_params",
    "lr_factor", "TrainConfig", "Trainer", "TrainError", "read_metrics", "train",
]
