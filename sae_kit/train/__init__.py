"""Training SAEs and transcoders: config, schedules, checkpoints and the loop."""
from sae_kit.train.config import TrainConfig
from sae_kit.train.loop import train
from sae_kit.train.sources import TensorSource

__all__ = ["TensorSource", "TrainConfig", "train"]
