"""The training engine: a Trainer made of components (DeepSpeed engine, EMA, metrics, evaluator, checkpointer)."""

from .trainer import Trainer, train

__all__ = ["Trainer", "train"]
