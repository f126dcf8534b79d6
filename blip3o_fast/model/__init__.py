"""The model: the DiT, its attention backends, and the rectified flow around it (loss and samplers)."""

from .dit import DiT

__all__ = ["DiT"]
