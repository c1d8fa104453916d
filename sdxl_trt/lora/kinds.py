"""One layer's update, for each kind of network a LoRA file can hold, merged as the host applications merge it.

Every kind reduces to a weight update ``delta W`` of the layer's weight shape, computed in fp32 (or the
dtype asked) from the file's factors; ``alpha_scale`` is the file's ``alpha / rank`` (1.0 without alpha):

* :class:`LoraFactors` (LoRA; LoCon on convolutions): ``up @ down``; with a Tucker core (LyCORIS
  ``lora_mid``) the core is contracted with both, as LyCORIS, A1111 and ComfyUI rebuild it;
* :class:`LohaFactors` (LyCORIS LoHa): the Hadamard product ``(w1_a @ w1_b) * (w2_a @ w2_b)``; with CP cores
  (``hada_t1``/``hada_t2``, convolutions) each side is its core contracted with its two factors;
* :class:`LokrFactors` (LyCORIS LoKr): the Kronecker product ``w1 (x) w2``, each side either whole or a
  low-rank product (``w2`` also through a CP core ``lokr_t2``).

DoRA (``dora_scale`` / peft's ``lora_magnitude_vector``, on any kind) renormalises the merged weight to the
stored magnitude per output channel (per input channel for the older kohya files that store it that way).
:meth:`LayerUpdate.apply` merges at a user's weight ``s`` as AUTOMATIC1111 and ComfyUI do:
``W + s * delta W``, and with DoRA ``W + s * (m * (W + delta W) / ||W + delta W|| - W)``, so a DoRA at
weight 0 is the base and stacked networks apply one after another in the request's order. (peft/diffusers
scale ``delta W`` inside the norm instead; both agree at weight 1.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

import torch

Device: TypeAlias = "str | torch.device | None"


def cp_rebuild(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A CP/Tucker-decomposed convolution weight ``[out, in, kh, kw]`` from its core ``[r, r, kh, kw]``, the
    output factor ``wa`` ``[r, out]`` and the input factor ``wb`` ``[r, in]`` (LyCORIS' ``make_weight_cp``)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core, wb, wa)


@dataclass(frozen=True, kw_only=True, repr=False)
class LayerUpdate:
    """What every kind shares: the weight it changes, ``alpha / rank``, and DoRA's magnitude if any."""

    shape: tuple[int, ...]  # the model weight's shape (checked against the model when read)
    alpha_scale: float
    magnitude: torch.Tensor | None = None  # DoRA: the target norm per output (or input) channel
    magnitude_on_output: bool = True  # False: per input channel (older kohya DoRA files)

    kind: ClassVar[str] = ""

    @property
    def rank(self) -> int:
        raise NotImplementedError

    def __repr__(self) -> str:  # never the tensors
        dora = ", DoRA" if self.magnitude is not None else ""
        return f"{type(self).__name__}({self.kind} on {self.shape}, rank {self.rank}, alpha/rank {self.alpha_scale:g}{dora})"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.shape

    def product(self, dtype: torch.dtype, device: Device) -> torch.Tensor:
        """The update before ``alpha_scale`` and the user's weight, in :attr:`shape`."""
        raise NotImplementedError

    def delta(self, scale: float = 1.0, *, dtype: torch.dtype = torch.float32, device: Device = None) -> torch.Tensor:
        """``delta W`` at ``scale`` in ``dtype`` (fp32 by default, whatever the file's); for DoRA this is the
        update before the renormalisation, which needs the weight (:meth:`apply`)."""
        return self.product(dtype, device).mul_(self.alpha_scale * scale)

    def apply(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """``weight`` with this update merged at ``scale``, written into ``weight`` (a float tensor the caller
        owns) and returned."""
        delta = self.delta(1.0, dtype=weight.dtype, device=weight.device)
        if self.magnitude is None:
            return weight.add_(delta, alpha=scale)
        merged = delta.add_(weight)
        norm = channel_norms(merged, on_output=self.magnitude_on_output)
        merged.mul_(self.magnitude.to(dtype=weight.dtype, device=weight.device).reshape(norm.shape) / norm)
        if scale == 1.0:  # as ComfyUI: the renormalised weight itself, not base + (it - base)
            return weight.copy_(merged)
        return weight.add_(merged.sub_(weight), alpha=scale)


def channel_norms(weight: torch.Tensor, *, on_output: bool) -> torch.Tensor:
    """The L2 norm of each output channel (row) of ``weight``, or of each input channel (column), shaped to
    broadcast against it."""
    ones = [1] * (weight.dim() - 2)
    if on_output:
        return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], 1, *ones)
    return weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, weight.shape[1], *ones)


@dataclass(frozen=True, kw_only=True, repr=False)
class LoraFactors(LayerUpdate):
    """LoRA / LoCon: ``up @ down``; conv factors are flattened over the kernel (``up`` 1x1, ``down`` carries
    the kernel) as peft merges them, or meet in a Tucker core ``mid`` (``down`` and ``up`` then 1x1)."""

    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw] ([rank, in, 1, 1] with mid)
    mid: torch.Tensor | None = None  # [rank, rank, kh, kw]

    kind: ClassVar[str] = "LoRA"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def product(self, dtype: torch.dtype, device: Device) -> torch.Tensor:
        up = self.up.to(device=device, dtype=dtype).flatten(1)
        down = self.down.to(device=device, dtype=dtype).flatten(1)
        if self.mid is not None:
            return cp_rebuild(self.mid.to(device=device, dtype=dtype), up.T, down).reshape(self.shape)
        return (up @ down).reshape(self.shape)


@dataclass(frozen=True, kw_only=True, repr=False)
class LohaFactors(LayerUpdate):
    """LoHa: ``(w1a @ w1b) * (w2a @ w2b)``; with CP cores ``t1``/``t2`` (convolutions) the ``a`` factors are
    ``[rank, out]`` and the ``b`` factors ``[rank, in]``, without them ``[out, rank]`` and ``[rank, in*kh*kw]``."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    kind: ClassVar[str] = "LoHa"

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])  # A1111's and ComfyUI's "dim"

    def product(self, dtype: torch.dtype, device: Device) -> torch.Tensor:
        def side(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
            a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
            if t is not None:
                return cp_rebuild(t.to(device=device, dtype=dtype), a, b.flatten(1))
            return (a.flatten(1) @ b.flatten(1)).reshape(self.shape)

        return side(self.w1a, self.w1b, self.t1).mul_(side(self.w2a, self.w2b, self.t2)).reshape(self.shape)


@dataclass(frozen=True, kw_only=True, repr=False)
class LokrFactors(LayerUpdate):
    """LoKr: ``w1 (x) w2`` (Kronecker), each side whole (``w1``, ``w2``) or a product (``w1a @ w1b``;
    ``w2a @ w2b``, or through a CP core ``t2`` for convolutions, then ``w2a`` is ``[rank, out]``)."""

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    kind: ClassVar[str] = "LoKr"

    @property
    def rank(self) -> int:
        """The rank of the decomposed side (w2's when both are; A1111's "dim"); 0 when both are whole."""
        for b in (self.w2b, self.w1b):
            if b is not None:
                return int(b.shape[0])
        return 0

    def product(self, dtype: torch.dtype, device: Device) -> torch.Tensor:
        def cast(t: torch.Tensor | None) -> torch.Tensor:
            assert t is not None
            return t.to(device=device, dtype=dtype)

        w1 = cast(self.w1) if self.w1 is not None else cast(self.w1a) @ cast(self.w1b)
        if self.w2 is not None:
            w2 = cast(self.w2)
        elif self.t2 is not None:
            w2 = cp_rebuild(cast(self.t2), cast(self.w2a), cast(self.w2b).flatten(1))
        else:
            w2 = cast(self.w2a) @ cast(self.w2b).flatten(1)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).reshape(self.shape)


def kron_shape(w1: tuple[int, ...], w2: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, elements per row) of ``w1 (x) w2`` flattened to 2-D."""
    return w1[0] * w2[0], w1[1] * math.prod(w2[1:])
