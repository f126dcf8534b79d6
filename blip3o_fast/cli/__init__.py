"""The `blip3o-fast` command line: every argparse parser of the package lives in this folder."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
