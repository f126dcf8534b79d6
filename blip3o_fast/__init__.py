"""blip3o-fast: a compiled, fast, correct training engine for BLIP3-o-style feature diffusion.

Importing the package is cheap; the compiled operators load with `blip3o_fast.ops`.
"""

__version__ = "0.1.0"
