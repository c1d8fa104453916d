"""SDXL's aspect-ratio buckets (about one megapixel, multiples of 64) and parsing of ``WxH`` sizes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .contracts import VAE_SCALE
from .errors import InvalidRequestError


@dataclass(frozen=True, order=True)
class Bucket:
    """One image size (width x height, pixels)."""

    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // VAE_SCALE, self.width // VAE_SCALE

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @classmethod
    def parse(cls, text: str) -> Bucket:
        """Parse ``"1024x1024"`` (width x height)."""
        parts = text.strip().lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InvalidRequestError(
                f"size {text!r} is not WIDTHxHEIGHT, e.g. '1024x1024'", param="size"
            )
        return cls(int(parts[0]), int(parts[1]))


SDXL_BUCKETS: tuple[Bucket, ...] = tuple(
    Bucket(w, h)
    for w, h in [
        (1024, 1024),
        (1152, 896),
        (896, 1152),
        (1216, 832),
        (832, 1216),
        (1344, 768),
        (768, 1344),
        (1536, 640),
        (640, 1536),
    ]
)
"""The nine SDXL training buckets, 1024x1024 first (the optimum of a range profile)."""


def parse_buckets(text: str, *, default: Sequence[Bucket] = SDXL_BUCKETS) -> list[Bucket]:
    """Parse ``--buckets``: ``all`` or a comma-separated list of ``WxH``."""
    if text.strip().lower() == "all":
        return list(default)
    out: list[Bucket] = []
    for part in text.split(","):
        if part.strip():
            b = Bucket.parse(part)
            if b not in out:
                out.append(b)
    if not out:
        raise InvalidRequestError(f"--buckets {text!r} names no size; use 'all' or e.g. '1024x1024,832x1216'")
    return out


def check_bucket_divisible(bucket: Bucket, latent_multiple: int) -> None:
    """Both sides must give latents divisible by the UNet's total downsampling."""
    step = VAE_SCALE * latent_multiple
    if bucket.width % step or bucket.height % step or bucket.width <= 0 or bucket.height <= 0:
        raise InvalidRequestError(
            f"size {bucket} is not usable: width and height must be positive multiples of {step} for this model",
            param="size",
        )


def nearest_bucket(width: int, height: int, buckets: Iterable[Bucket]) -> Bucket:
    """The bucket closest in aspect ratio (then in area) to ``width x height``."""
    import math

    def key(b: Bucket) -> tuple[float, float]:
        return (abs(math.log(b.width / b.height) - math.log(width / height)), abs(b.pixels - width * height))

    return min(buckets, key=key)
