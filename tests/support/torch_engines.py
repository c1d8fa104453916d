"""Engine sets for the graph tests: one set of loaded engines shared by several pipelines (graphed, eager), so
a test pays for loading once.

On the CPU (``in_memory``) the engines are the runtime's :class:`TorchEngine` around the tiny PyTorch
components themselves, with an engine directory's manifest, tokenizers and weight map: a graph records the
same aten operators whether a module is eager or a ``torch.export`` program, and exporting plus loading the
tiny torch programs costs about four CPU minutes (57 s of it loading), more than all the graph tests'
budget. They may take smaller buckets than the directory was built for (``buckets=``: the manifest is the
one a build with ``--buckets`` would write, its profiles derived the same way), since the torch modules run at
any size and a quarter of the pixels is a quarter of the CPU time. On a GPU (``loaded``) they are the engine
directory's own engines.

Pipelines that share engines must not interleave LoRA switches: each pipeline keeps the base weights it
read first, so a test that switches LoRAs on one ends it on the base set before another pipeline runs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sdxl_trt.buckets import Bucket
from sdxl_trt.contracts import ModelDims, component_specs, controlnet_names
from sdxl_trt.engine_dir.manifest import Manifest, open_engine_dir
from sdxl_trt.engine_dir.profiles import Profile, component_profiles

TINY_TORCH_BUCKETS = ("128x128", "192x128")
"""The emulated graph tests' buckets, a square and a wide one: about a third of the tiny buckets' pixels
(multiples of 64, as the refiner's three downsamplings need), so the CPU runs their UNets three times as fast."""


@dataclass
class EngineSet:
    directory: Path
    manifest: Manifest
    engines: dict[str, Any]
    device: torch.device

    @classmethod
    def loaded(cls, directory: Path, device: torch.device) -> EngineSet:
        """The directory's engines, loaded from their files."""
        from sdxl_trt.runtime.loader import load_engines

        manifest = open_engine_dir(directory, verify_hashes=False)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return cls(directory, manifest, load_engines(directory, manifest, device=device), device)

    @classmethod
    def in_memory(cls, directory: Path, modules: Mapping[str, torch.nn.Module],
                  buckets: Sequence[str] | None = None) -> EngineSet:
        """TorchEngines (fp32, CPU) around ``modules`` (export/wrappers.py's components, copied), for every
        component of the directory's manifest; at ``buckets`` (default: the directory's)."""
        from sdxl_trt.runtime.torch_engine import TorchEngine

        manifest = open_engine_dir(directory, verify_hashes=False)
        specs = component_specs(ModelDims.from_json(manifest.model_dims), controlnet_names(manifest.components))
        if buckets is not None:
            manifest = _rebucketed(manifest, specs, list(buckets))
        engines = {}
        for name, entry in manifest.components.items():
            spec, module = specs[name], copy.deepcopy(modules[name])  # LoRA tests change weights in place
            dtypes = {t.name: torch.int64 if t.dtype == "int64" else torch.float32 for t in spec.tensors}
            engine = TorchEngine(module, spec, [Profile.from_json(p) for p in entry.profiles],
                                 device=torch.device("cpu"), input_dtypes={t.name: dtypes[t.name] for t in spec.inputs},
                                 output_dtypes={t.name: dtypes[t.name] for t in spec.outputs}, compiled=False)
            engine._weights = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            engines[name] = engine
        return cls(directory, manifest, engines, torch.device("cpu"))

    def pipeline(self, *, cuda_graphs: str, **kwargs: Any) -> Any:
        """A new pipeline over these engines (its own arena, tables and graphs)."""
        from sdxl_trt.runtime.pipeline import Pipeline

        return Pipeline(self.directory, self.manifest, self.engines, self.device, cuda_graphs=cuda_graphs, **kwargs)


def _rebucketed(manifest: Manifest, specs: Mapping[str, Any], buckets: list[str]) -> Manifest:
    """``manifest`` as a build with these buckets would have written it (profiles recomputed)."""
    parsed = [Bucket.parse(b) for b in buckets]

    def profiles(name: str) -> list[dict[str, Any]]:
        return [p.to_json() for p in component_profiles(
            specs[name], buckets=parsed, max_batch=manifest.max_batch, mode=manifest.profile_mode,  # type: ignore[arg-type]
            max_prompt_chunks=manifest.max_prompt_chunks)]

    return replace(manifest, buckets=buckets,
                   components={n: replace(e, profiles=profiles(n)) for n, e in manifest.components.items()})


@dataclass
class TinyTorchEngines:
    """The two CPU engine sets: ``controlnet`` (tiny, its UNet taking residuals, ControlNets ``edges`` and
    ``depth``) and ``refiner`` (tiny and tiny-refiner)."""

    controlnet: EngineSet
    refiner: EngineSet
