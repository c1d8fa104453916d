"""``sdxl-trt export``: every component to verified ONNX, and the table of errors against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_model_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export every component to verified ONNX")
    add_model_arguments(p)
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--force", action="store_true", help="export again even if up to date")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from sdxl_trt.export.exporter import export_model, format_export_table

    manifest = export_model(
        args.model, out=Path(args.out), refiner=args.refiner, precision=args.precision,
        device=args.device, model_config=args.model_config, force=args.force,
    )
    print(format_export_table(manifest))
    print(f"\nwrote {Path(args.out) / 'manifest.json'}")
    return 0
