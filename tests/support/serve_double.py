"""``sdxl-trt serve`` over a pipeline double, as a real server process (same flags, same uvicorn edge):
``python tests/support/serve_double.py --port N [serve flags]``.

The double misbehaves on cue, by prompt, so tests can see what clients get when the engine does: ``boom``
raises an unexpected exception inside the batch, ``short`` returns too few results, ``hang`` blocks for
``HANG_S``; ``slow`` takes ``SLOW_S``; ``crash`` raises CUDA's illegal-address error, which (as on a GPU) every
later call raises too; anything else returns tiny images at once. ``$SDXL_TRT_DOUBLE_CONTROLNETS`` (comma-separated
names) makes it claim those ControlNets, so the server decodes and preprocesses control images.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for ``support``

from PIL import Image  # noqa: E402

from sdxl_trt.cli.serve import register, run_server, settings_from_args  # noqa: E402
from sdxl_trt.request import GenerationRequest, GenerationResult  # noqa: E402
from support.serve_fakes import GatedPipeline  # noqa: E402

HANG_S = 8.0
SLOW_S = 1.5
ILLEGAL_ADDRESS = ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                   "asynchronously reported at some other API call, so the stacktrace below might be incorrect.")
"""torch's message for cudaErrorIllegalAddress."""


class MisbehavingPipeline(GatedPipeline):
    def __init__(self) -> None:
        super().__init__(open_gate=True)
        self.controlnet_names = [n for n in os.environ.get("SDXL_TRT_DOUBLE_CONTROLNETS", "").split(",") if n]
        self.crashed = False

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        prompts = [r.prompt for r in requests]
        if self.crashed or "crash" in prompts:
            self.crashed = True  # a sticky error: the CUDA context is unusable from now on
            raise RuntimeError(ILLEGAL_ADDRESS)
        if "boom" in prompts:
            raise KeyError("an unexpected bug inside the engine")
        if "hang" in prompts:
            time.sleep(HANG_S)
        if "slow" in prompts:
            time.sleep(SLOW_S)
        results = [GenerationResult(images=[Image.new("RGB", (8, 8), (9, 9, 9))] * r.num_images,
                                    seeds=[(r.seed or 0) + k for k in range(r.num_images)],
                                    timings={"denoise": 0.01}, parameters={"steps": r.steps}) for r in requests]
        return results[:-1] if "short" in prompts else results


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="serve_double")
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--engines", "unused", *argv])
    return run_server(settings_from_args(args), lambda settings: MisbehavingPipeline())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
