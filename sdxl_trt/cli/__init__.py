"""``sdxl-trt``: export, build, info, run, serve, bench; one module per subcommand.

Each subcommand is a thin layer over the library: parse flags, call one function, print its result. Each
module's ``register`` adds its parser; stages are imported when a command runs, so ``sdxl-trt --help`` loads
none of them. Errors the user can fix (:class:`~sdxl_trt.errors.SdxlTrtError`) print as one line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sdxl_trt.errors import SdxlTrtError

from . import bench, build, export, info, run

log = logging.getLogger("sdxl_trt")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL", "diffusers", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-trt", description="Compiled SDXL inference: export, build, run, serve.")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (export, build, info, run, bench):
        command.register(sub)
    _add_serve(sub)
    return parser


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """``serve`` needs the [serve] extra; it registers itself when its module imports."""
    try:
        from . import serve
    except ImportError as e:
        log.debug("sdxl-trt serve is unavailable: %s", e)
        return
    serve.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args))
    except SdxlTrtError as e:
        print(f"sdxl-trt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
