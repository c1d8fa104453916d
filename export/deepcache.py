"""Step caching (DeepCache, Ma et al. 2024): the full UNet's cached feature and the shallow UNet that reuses it.

DeepCache's ``DeepCacheSDHelper`` wraps diffusers' block forwards and, on a skip step, returns the outputs it
kept from the last full step. Worked out from that code, for branch ``K`` with ``b = K // 3`` and
``l = K % 3`` a skip step skips everything deeper than (down block b, layer l): the down blocks after b, the
mid block, the up blocks whose reversed index is above b, and inside down block b its layers >= l (and its
downsampler), inside up block b (reversed index) its layers with reversed index > l. What still runs, the
*shallow UNet*: the time and text embeddings, ``conv_in``, the down layers before the branch, up block b's
layers with reversed index <= l (they read only freshly computed skip connections), the later up blocks and
``conv_norm_out``/``conv_act``/``conv_out``. Everything the skipped part hands the running part is one tensor:
the hidden state entering up block b's first running layer (for l = 2 the previous up block's upsampled output,
or the mid block's output below the deepest block). That is the feature the full UNet returns as
``deepcache_feature_K`` and the shallow UNet takes as ``deepcache_feature``.

Both wrappers take and return plain tensors in the contract's order and hold no value-dependent branching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sdxl_trt.contracts import deepcache_feature_name
from sdxl_trt.errors import ExportError

LAYERS_PER_LEVEL = 3
"""DeepCache's branch numbering: ``cache_layer_id = K % 3`` (SDXL's two resnets plus a downsampler per block)."""


def branch_position(branch: int, unet_config: Any) -> tuple[int, int]:
    """``(block, layer)`` of DeepCache branch ``branch`` in a UNet of this config, or an error naming the branches
    the UNet has."""
    blocks = len(unet_config.block_out_channels)
    if int(unet_config.layers_per_block if isinstance(unet_config.layers_per_block, int)
           else max(unet_config.layers_per_block)) != LAYERS_PER_LEVEL - 1:
        raise ExportError(f"--deepcache needs a UNet with {LAYERS_PER_LEVEL - 1} layers per block (SDXL's), this one "
                          f"has layers_per_block={unet_config.layers_per_block}")
    if not 0 <= branch < LAYERS_PER_LEVEL * blocks:
        raise ExportError(f"--deepcache branch {branch} does not exist: this UNet has branches "
                          f"0-{LAYERS_PER_LEVEL * blocks - 1} ({blocks} blocks x {LAYERS_PER_LEVEL} layers)")
    return branch // LAYERS_PER_LEVEL, branch % LAYERS_PER_LEVEL


def deepcache_features(unet_config: Any, branches: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """``(branch, channels, downscale)`` of each branch's feature, read off the UNet's config: the feature sits
    at down block b's resolution (``2**b``) with up block b's width, or the block above's when it enters up
    block b itself (l = 2)."""
    out = []
    channels = list(unet_config.block_out_channels)
    for k in sorted(set(branches)):
        b, layer = branch_position(k, unet_config)
        first_running = LAYERS_PER_LEVEL - 1 - layer  # up block b's first running layer (forward order)
        width = channels[b] if first_running > 0 else channels[min(b + 1, len(channels) - 1)]
        out.append((k, width, 2 ** b))
    return tuple(out)


def _embeddings(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, timestep_cond: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's time + micro-conditioning embedding and its processed context, as its own forward makes them."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={})
    return emb, context


def _layer(block: nn.Module, j: int, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Layer ``j`` of a down or up block: its resnet, then its transformer if the block has cross-attention."""
    hidden = block.resnets[j](hidden, emb)
    if getattr(block, "has_cross_attention", False):
        hidden = block.attentions[j](hidden, encoder_hidden_states=context, return_dict=False)[0]
    return hidden


class ShallowUNetWrapper(nn.Module):
    """The shallow UNet of branch ``branch``: the base UNet's inputs (``timestep_cond`` for a guidance-distilled
    one) plus ``deepcache_feature``; returns the noise prediction of DeepCache's skip step."""

    def __init__(self, unet: nn.Module, branch: int) -> None:
        super().__init__()
        self.unet = unet
        self.branch = branch
        self.block, self.layer = branch_position(branch, unet.config)
        self.has_time_cond = bool(getattr(unet.config, "time_cond_proj_dim", None))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        timestep_cond = rest[0] if self.has_time_cond else None
        feature = rest[-1]
        unet, b, layer = self.unet, self.block, self.layer
        emb, context = _embeddings(unet, sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond)
        hidden = unet.conv_in(sample)
        skips: list[torch.Tensor] = [hidden]
        for block in unet.down_blocks[:b]:
            if getattr(block, "has_cross_attention", False):
                hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
            else:
                hidden, res = block(hidden_states=hidden, temb=emb)
            skips.extend(res)
        for j in range(layer):
            hidden = _layer(unet.down_blocks[b], j, hidden, emb, context)
            skips.append(hidden)
        ups = unet.up_blocks
        up = ups[len(ups) - 1 - b]
        hidden = feature
        for j in range(len(up.resnets) - 1 - layer, len(up.resnets)):
            hidden = torch.cat([hidden, skips.pop()], dim=1)
            hidden = _layer(up, j, hidden, emb, context)
        for upsampler in up.upsamplers or []:
            hidden = upsampler(hidden, None)
        for up in ups[len(ups) - b:]:
            res = tuple(skips[-len(up.resnets):])
            del skips[-len(up.resnets):]
            if getattr(up, "has_cross_attention", False):
                hidden = up(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context)
            else:
                hidden = up(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res)
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


class FeatureCapture:
    """Forward hooks that keep each branch's feature while the full UNet runs (the UNet's own forward, untouched):
    the output of the layer before up block b's first running one, or up block b's input when that is its first."""

    def __init__(self, unet: nn.Module, branches: Sequence[int]) -> None:
        self.features: dict[int, torch.Tensor] = {}
        self.handles = []
        ups = unet.up_blocks
        for k in branches:
            b, layer = branch_position(k, unet.config)
            up = ups[len(ups) - 1 - b]
            first = len(up.resnets) - 1 - layer
            if first == 0:
                self.handles.append(up.register_forward_pre_hook(self._input_hook(k), with_kwargs=True))
            else:
                module = up.attentions[first - 1] if getattr(up, "has_cross_attention", False) else up.resnets[first - 1]
                self.handles.append(module.register_forward_hook(self._output_hook(k)))

    def _input_hook(self, k: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.features[k] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    def _output_hook(self, k: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.features[k] = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class FeatureUNetWrapper(nn.Module):
    """The full UNet of a ``--deepcache`` build: the plain UNet's inputs; returns the noise prediction, then one
    ``deepcache_feature_K`` per built branch (ascending K)."""

    def __init__(self, unet: nn.Module, branches: Sequence[int]) -> None:
        super().__init__()
        self.unet = unet
        self.branches = sorted(set(branches))
        self.output_names = ["noise_pred", *(deepcache_feature_name(k) for k in self.branches)]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, timestep_cond: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, ...]:
        capture = FeatureCapture(self.unet, self.branches)
        try:
            noise = self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                              added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                              return_dict=False)[0]
        finally:
            capture.remove()
        return (noise, *(capture.features[k] for k in self.branches))
