"""Using a trained model (docs/architecture.md §3.13): load, generate, export, share."""

from .pretrained import FeatureGenerator

__all__ = ["FeatureGenerator"]
