"""fp16 ONNX error at the full-size SDXL layer shapes: what ``--precision fp16`` costs where tiny cannot show it.

The tiny preset's widths (32-64 channels) do not reach the full-size accumulation lengths (1280 channels, 2048-wide
cross-attention context, 5120-wide CLIP MLPs), where fp16 rounding grows. This program builds one of each layer
kind SDXL's networks are made of at the full-size shapes, with seeded random weights (no weights are downloaded),
exports each as the project exports a component (traced from the fp16 module, ``clean_graph`` + ``unify_float16``)
and as fp32, runs both with ONNX Runtime's CPU provider, and measures each output against PyTorch fp32 (relative
L2); the fp32 ONNX file is the baseline in the same run (``--torch-fp16`` adds PyTorch's own fp16 forward, which
is very slow on CPUs without fp16 arithmetic)::

    python benchmarks/bench_fp16_layers.py

Writes ``benchmarks/results/fp16-layers-full-size.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench_fp16_layers")


def layers() -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...], str]]:
    """(module, inputs, what) per layer kind, at SDXL-base full-size shapes (1024x1024: latent 128x128)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from diffusers.models.resnet import ResnetBlock2D
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    class Time(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.emb = Timesteps(320, True, 0), TimestepEmbedding(320, 1280)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.emb(self.proj(t).to(self.emb.linear_1.weight.dtype))

    class Resnet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = ResnetBlock2D(in_channels=640, out_channels=1280, temb_channels=1280)

        def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
            return self.block(x, temb)

    class Transformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = BasicTransformerBlock(1280, 20, 64, cross_attention_dim=2048)

        def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self.block(x, encoder_hidden_states=context)

    class Clip(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                    hidden_act="gelu")
            config._attn_implementation = "eager"
            self.layer = CLIPEncoderLayer(config)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x, None)[0] if isinstance(self.layer(x, None), tuple) else self.layer(x, None)

    torch.manual_seed(0)
    out = {
        "time embedding (320 -> 1280)": (Time(), (torch.rand(2, generator=g) * 999,),
                                         "UNet time MLP, float32 t in [0, 1000)"),
        "ResNet block 640 -> 1280 @ 32x32": (Resnet(), (randn(1, 640, 32, 32), randn(1, 1280)),
                                             "UNet mid/down-2 ResNet"),
        "transformer block 1280, ctx 2048 @ 1024 tokens": (Transformer(), (randn(1, 1024, 1280), randn(1, 77, 2048)),
                                                           "UNet down-2 attention (self + cross + GEGLU)"),
        "CLIP-bigG encoder layer 1280 @ 77 tokens": (Clip(), (randn(2, 77, 1280),), "text_encoder_2 layer"),
    }
    for m, _, _ in out.values():
        m.eval()
    return out


def _small(x: torch.Tensor) -> torch.Tensor:
    """A trace-sized copy: 1 row and at most 8 along spatial/token axes (PyTorch's CPU fp16 convolutions are too slow
    to trace at full size; the graph is traced with dynamic axes and run at full size, as the exporter does)."""
    if x.ndim == 1:
        return x[:1]
    index = [slice(0, 1)] + [slice(0, 8) if i in _spatial(x) else slice(None) for i in range(1, x.ndim)]
    return x[tuple(index)].contiguous()


def _spatial(x: torch.Tensor) -> tuple[int, ...]:
    """Axes that vary with the image: tokens of [B, tokens, C], height and width of [B, C, H, W]."""
    return {3: (1,), 4: (2, 3)}.get(x.ndim, ())


def run_onnx(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype, path: Path) -> np.ndarray:
    import onnx
    import onnxruntime as ort

    from sdxl_trt.export.onnx_export import ONNX_OPSET, clean_graph, save_onnx, unify_float16

    # The timestep is a float32 input in every precision (the contract's): only activations follow ``dtype``.
    cast = tuple(x if x.ndim == 1 else x.to(dtype) for x in inputs)
    raw = path.with_suffix(".raw.onnx")
    names = [f"in{i}" for i in range(len(cast))]
    axes = {n: {a: f"{n}_{a}" for a in (0, *_spatial(x))} for n, x in zip(names, cast, strict=True)}
    axes["out"] = {0: "out_0", 1: "out_1", 2: "out_2", 3: "out_3"}  # a superset is fine: rank-3 outputs use 0-2
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.to(dtype), tuple(_small(x) for x in cast), str(raw), opset_version=ONNX_OPSET,
                          dynamo=False, input_names=names, output_names=["out"], dynamic_axes=axes)
    model = clean_graph(onnx.load(str(raw)))
    if dtype == torch.float16:
        unify_float16(model)
    save_onnx(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {f"in{i}": x.numpy() for i, x in enumerate(cast)}
    return np.asarray(session.run(["out"], feeds)[0], dtype=np.float64)


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="fp16-layers-full-size")
    p.add_argument("--torch-fp16", action="store_true", help="also PyTorch's fp16 forward (slow on CPU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (module, inputs, what)) in enumerate(layers().items()):
            t0 = time.perf_counter()
            with torch.inference_mode():
                ref = module.float()(*inputs).double().numpy()
                torch16 = (module.half()(*(x if x.ndim == 1 else x.half() for x in inputs)).double().numpy()
                           if args.torch_fp16 else None)
            onnx32 = run_onnx(module, inputs, torch.float32, Path(tmp) / f"{i}.fp32.onnx")
            onnx16 = run_onnx(module, inputs, torch.float16, Path(tmp) / f"{i}.fp16.onnx")
            row = {"layer": name, "what": what, "params": sum(p.numel() for p in module.parameters()),
                   "onnx_fp32_rel_l2": rel_l2(onnx32, ref), "onnx_fp16_rel_l2": rel_l2(onnx16, ref),
                   "torch_fp16_rel_l2": None if torch16 is None else rel_l2(torch16, ref), "finite": bool(np.isfinite(onnx16).all()),
                   "seconds": round(time.perf_counter() - t0, 1)}
            log.info("%s", row)
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "python": sys.version.split()[0]}
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# fp16 ONNX at full-size SDXL layer shapes (seeded random weights, ONNX Runtime CPU)", "",
             "Relative L2 error of each output against PyTorch fp32; the fp32 ONNX file is the baseline measured in "
             "the same run. Command: `python benchmarks/bench_fp16_layers.py`.", "",
             "| layer | params | ONNX fp32 | ONNX fp16 | PyTorch fp16 | finite |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} ({r['what']}) | {r['params'] / 1e6:.1f} M | {r['onnx_fp32_rel_l2']:.1e} | "
                     f"{r['onnx_fp16_rel_l2']:.1e} | "
                     f"{'-' if r['torch_fp16_rel_l2'] is None else format(r['torch_fp16_rel_l2'], '.1e')} | {r['finite']} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
