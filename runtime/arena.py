"""The buffer arena: every tensor the pipeline touches is allocated once, at load, at its largest size.

Requests take views (``arena.view(name, shape)``) of those flat buffers, so a request allocates no
device memory of its own and CUDA graphs see the same addresses on every replay (vLLM's InputBuffers
idea). Sizes come from the component contracts at the largest bucket and batch the engines were built
for; asking for a larger view is a bug and raises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class Arena:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def reserve(self, name: str, max_shape: Sequence[int], dtype: torch.dtype) -> None:
        """Reserve room for ``name`` at ``max_shape`` (growing an earlier reservation, never shrinking)."""
        numel = math.prod(max_shape)
        old = self._buffers.get(name)
        if old is not None and old.numel() >= numel and old.dtype == dtype:
            return
        self._buffers[name] = torch.zeros(numel, dtype=dtype, device=self.device)

    def view(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        """A contiguous view of ``name`` with ``shape``; its address never changes."""
        buf = self._buffers[name]
        numel = math.prod(shape)
        if numel > buf.numel():
            raise RuntimeError(f"arena buffer {name!r} holds {buf.numel()} elements, {tuple(shape)} needs {numel}")
        return buf[:numel].view(*shape)

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
