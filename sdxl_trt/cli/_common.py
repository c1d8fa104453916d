"""Flags more than one subcommand takes."""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model to export or build from, and where the result goes (``export`` and ``build``)."""
    p.add_argument("--model", default="tiny", help="preset (tiny, sdxl-base-1.0, ...), diffusers dir or .safetensors")
    p.add_argument("--refiner", default=None, help="refiner: preset (tiny-refiner, sdxl-refiner-1.0) or local path")
    p.add_argument("--model-config", default=None, help="diffusers-format config dir for a single-file --model")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", help="where PyTorch runs during export (cpu or cuda)")
