"""The training loop shared by every model of the project (codec, recall models, DuplexLM)."""

from duplex.train.loop import TrainConfig, TrainResult, lr_at, seed_everything, train

__all__ = ["TrainConfig", "TrainResult", "lr_at", "seed_everything", "train"]
