"""Training SAEs and transcoders: config, schedules, dead-latent tracking, checkpoints and the loop."""
from sae_kit.train.config import SAESpec, SweepConfig, TrainConfig
from sae_kit.train.loop import train, train_all
from sae_kit.train.sources import TensorSource

__all__ = ["SAESpec", "SweepConfig", "TensorSource", "TrainConfig", "train", "train_all"]
