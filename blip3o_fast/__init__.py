"""blip3o-fast: a compiled, fast, correct training engine for BLIP3-o-style feature diffusion.

Importing the package is cheap; the compiled operators load with `blip3o_fast.ops`, and
`blip3o_fast.FeatureGenerator` (docs/architecture.md §3.13) imports the model on first use.
"""

__version__ = "0.1.0"
__all__ = ["FeatureGenerator", "__version__"]


def __getattr__(name: str):
    if name == "FeatureGenerator":  # lazily: torch and the model load only when it is asked for
        from .inference import FeatureGenerator

        return FeatureGenerator
    raise AttributeError(f"module 'blip3o_fast' has no attribute {name!r}")
