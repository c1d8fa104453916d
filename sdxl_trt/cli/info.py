"""``sdxl-trt info``: an engine directory's manifest, as a person reads it (or as JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print an engine directory's manifest")
    p.add_argument("engines")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from sdxl_trt.engine_dir.describe import format_manifest
    from sdxl_trt.engine_dir.manifest import Manifest

    manifest = Manifest.load(Path(args.engines))
    print(json.dumps(manifest.to_json(), indent=2) if args.json else format_manifest(manifest))
    return 0
