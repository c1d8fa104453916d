"""What ``Pipeline.warmup`` promises (issue 20 items 6 and 10), on emulated CUDA graphs over the tiny torch
engines: afterwards no request within its buckets, batch sizes, samplers and guidance reaches a graph key it
did not capture (negative prompts, two prompt chunks, img2img, inpainting); the VAE runs eagerly at every
(bucket, batch) after the last capture (which empties the allocator's cache on a GPU); and a ``--compile`` build
compiles every shape the warm-up runs, so that it recompiles nothing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from support.torch_engines import TINY_TORCH_BUCKETS

from sdxl_trt.buckets import Bucket
from sdxl_trt.contracts import family_of
from sdxl_trt.engine_dir.profiles import Profile
from sdxl_trt.request import GenerationRequest

SIZES = (1, 2)  # 1 and max_batch: the default warm-up's batch sizes


@dataclass
class Warmed:
    pipe: Any
    events: list[tuple[Any, ...]] = field(default_factory=list)  # ("capture", key) or (engine, named dims)


def _dims(name: str, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """An engine call's named dimensions, as the build's compile shapes name them."""
    family = family_of(name)
    if family == "text_encoder":
        return {"B": inputs["input_ids"].shape[0]}
    if name == "vae_encoder":
        b, _, h, w = inputs["images"].shape
        return {"B": b, "h": h // 8, "w": w // 8}
    if name == "vae_decoder":
        b, _, h, w = inputs["latent"].shape
        return {"B": b, "h": h, "w": w}
    b, _, h, w = inputs["sample"].shape
    return {"B": b, "h": h, "w": w, "S": inputs["encoder_hidden_states"].shape[1]}


@pytest.fixture(scope="module")
def warmed(graph_test_engines: Any) -> Iterator[Warmed]:
    """A pipeline after warmup(every bucket, SIZES, one step, no ControlNet), with every engine call and
    capture of the warm-up recorded in order."""
    engines = graph_test_engines.controlnet
    pipe = engines.pipeline(cuda_graphs="emulate")
    w = Warmed(pipe)
    with pytest.MonkeyPatch.context() as mp:
        for name, engine in engines.engines.items():
            real = engine.run

            def run(inputs: dict[str, torch.Tensor], outputs: Any, *args: Any, name: str = name, real: Any = real,
                    **kwargs: Any) -> None:
                w.events.append((name, _dims(name, inputs)))
                real(inputs, outputs, *args, **kwargs)

            mp.setattr(engine, "run", run)
        real_capture = pipe.ctx.graphs._capture

        def capture(key: Any, *args: Any, **kwargs: Any) -> Any:
            w.events.append(("capture", key))
            return real_capture(key, *args, **kwargs)

        mp.setattr(pipe.ctx.graphs, "_capture", capture)
        pipe.warmup(batch_sizes=list(SIZES), steps=1, controlnets=[])
        yield w


def test_no_request_misses_a_captured_key_after_warmup(warmed: Warmed) -> None:
    pipe = warmed.pipe
    captured = pipe.cuda_graph_stats()["graphs"]
    assert not pipe.ctx.graphs._warned, "the warm-up itself ran a key eagerly"
    long = "a lighthouse on a cliff at dusk, " + ", ".join(f"detail {i}" for i in range(25))  # 2 chunks
    seen_chunks = set()
    for bucket in TINY_TORCH_BUCKETS:
        b = Bucket.parse(bucket)
        image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (b.height, b.width, 3), dtype=np.uint8))
        mask = Image.new("L", image.size, 0)
        mask.paste(255, (0, 0, b.width // 2, b.height // 2))
        for n in SIZES:
            for prompt in ("a fox", long):
                for negative in ("", "blurry, low quality"):
                    for extra in ({}, {"init_image": image, "strength": 0.6},
                                  {"init_image": image, "mask_image": mask, "strength": 0.9}):
                        req = GenerationRequest(prompt=prompt, negative_prompt=negative, width=b.width,
                                                height=b.height, num_images=n, steps=2, seed=n, **extra)
                        seen_chunks.add(pipe.conditioner.prompt_chunks(req))
                        pipe.generate(req)
                        assert not pipe.ctx.graphs._warned, f"{req.mode} {bucket} x{n} {prompt[:20]!r} " \
                                                            f"negative {negative!r} ran eagerly"
    assert seen_chunks == {1, 2}
    assert pipe.cuda_graph_stats()["graphs"] == captured


def test_the_vae_runs_at_every_bucket_and_batch_after_the_last_capture(warmed: Warmed) -> None:
    events = warmed.events
    last = max(k for k, e in enumerate(events) if e[0] == "capture")
    after = [e for e in events[last + 1 :] if e[0] in ("vae_encoder", "vae_decoder")]
    for bucket in TINY_TORCH_BUCKETS:
        h, w = Bucket.parse(bucket).latent_hw
        assert ("vae_encoder", {"B": 1, "h": h, "w": w}) in after, bucket  # the encoder takes one image at a time
        for n in SIZES:
            assert ("vae_decoder", {"B": n, "h": h, "w": w}) in after, (bucket, n)


def test_a_compile_build_compiles_every_shape_the_warmup_runs(warmed: Warmed) -> None:
    from sdxl_trt.engine.torch_backend import compile_shapes

    manifest = warmed.pipe.manifest
    ran: dict[str, set[tuple]] = {}
    for e in warmed.events:
        if e[0] != "capture":
            ran.setdefault(e[0], set()).add(tuple(sorted(e[1].items())))
    assert {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"} <= set(ran)
    for name, shapes in ran.items():
        profiles = [Profile.from_json(p) for p in manifest.components[name].profiles]
        assert manifest.max_prompt_chunks >= 2  # what the build caps the prompt chunks at does not bind here
        compiled = {tuple(sorted(s.items())) for s in compile_shapes(name, profiles, manifest.max_batch)}
        assert shapes <= compiled, (name, sorted(shapes - compiled))
