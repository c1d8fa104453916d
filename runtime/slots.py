"""The runtime's units of work, as values: one image (:class:`Slot`), a batch of images that share a step shape
(:class:`Batch`, what ``BatchRunner.run`` takes) and what a batch gives back (:class:`BatchResult`).

conditioning.py makes the slots, pipeline.py groups them into batches by their request's
:class:`~sdxl_trt.step_shape.StepShape`, batch.py runs a batch and returns its result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sdxl_trt.request import GenerationRequest
from sdxl_trt.step_shape import StepShape

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class Slot:
    """One image of one request: the request, its index in the call (where the image goes back), the image's
    seed and generator, and the request's conditioning (shared by its images)."""

    request: GenerationRequest
    request_index: int
    image_index: int
    seed: int
    generator: torch.Generator
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # embeds/pooled/time_ids, pos & neg, per UNet

    @property
    def guidance(self) -> float:
        return float(self.request.guidance_scale)


@dataclass(frozen=True)
class Batch:
    """Images (at most the engines' max batch) whose requests share one step shape; ``slots`` in row order."""

    shape: StepShape
    slots: tuple[Slot, ...]

    def __post_init__(self) -> None:
        if not self.slots:
            raise ValueError("a batch holds at least one image")

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def requests(self) -> dict[int, GenerationRequest]:
        """The batch's requests by their index in the call, in the order their first image appears."""
        return {s.request_index: s.request for s in self.slots}


@dataclass
class BatchResult:
    """A batch's images (PIL, one per slot, in slot order), the denoising steps each UNet ran ("unet",
    "refiner") and the seconds of each stage (vae_encode, denoise, refiner, vae_decode)."""

    images: list[Image.Image]
    steps_run: dict[str, int]
    timings: dict[str, float]
