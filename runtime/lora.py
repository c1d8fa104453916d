"""Per-request LoRAs: switch the engines' weights between batches, never their engines, graphs or buffers.

A switch computes, for every weight the old or the new LoRA set touches, the base weight with each file of
the set merged in order (``+ scale * delta``; DoRA renormalises per channel: :mod:`sdxl_trt.lora.kinds`;
LoRA, LoCon, LoHa, LoKr and DoRA alike) from a kept copy of the base weight (never delta on delta, so
A -> B -> A gives A's weights bit for bit) and hands the values to each engine by the name the weight map
recorded at build time:

* torch engines overwrite their parameters in place (same addresses: CUDA graphs and compiled code stay
  valid);
* ONNX Runtime engines switch to a session with those initializers (a few recent sessions are kept);
* TensorRT engines built ``--refittable`` are refit (others refuse, naming the rebuild).

LoRA files are read once (through :func:`sdxl_trt.lora.reading.read_lora`, which imports diffusers for its
key conversion the first time a LoRA is used) and looked up by name in ``lora_dirs`` (``NAME.safetensors``)
or, for the Python API and the CLI, by path. A listed file must resolve inside its directory (a symlink out
of it is left out of the listing, and checked again when read); a file that failed to read is remembered by
(path, size, mtime), so it is not read again until it changes; errors name a LoRA by its file name, not its
path. INT8 UNets take LoRAs only fused at build.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdxl_trt.engine_dir.layout import WEIGHT_MAP_NAME, export_onnx_path
from sdxl_trt.errors import InvalidRequestError, ManifestError
from sdxl_trt.lora import Lora, LoraError, merged_weights
from sdxl_trt.lora.apply import base_weights_from_onnx, onnx_weight_updates
from sdxl_trt.lora.canonical import MAX_ABS_SCALE
from sdxl_trt.lora.weight_map import ComponentWeights, WeightMap

from .context import EngineContext

log = logging.getLogger(__name__)

LoraSet = tuple[tuple[str, float], ...]
"""(name or path, scale) pairs in the order a request gives them; () is the base model."""

LORA_FILE_SUFFIX = ".safetensors"


def check_lora_set(loras: Sequence[tuple[str, float]]) -> LoraSet:
    """The request's LoRA set in canonical form, or an error naming the bad entry."""
    out = []
    for entry in loras:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise InvalidRequestError(f"each LoRA is (name, scale), got {entry!r}", param="loras")
        name, scale = entry[0], entry[1]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or abs(scale) > MAX_ABS_SCALE:
            raise InvalidRequestError(f"LoRA {name!r}: scale {scale!r} must be a number in "
                                      f"[-{MAX_ABS_SCALE:g}, {MAX_ABS_SCALE:g}]", param="loras")
        out.append((name, float(scale)))
    return tuple(out)


class LoraSwitcher:
    """The LoRA state of one pipeline's engines; ``activate`` is called under the pipeline's lock."""

    FILES_KEPT = 16

    def __init__(self, ctx: EngineContext, directory: Path, lora_dirs: Sequence[str | Path] = ()) -> None:
        self.ctx = ctx
        self.directory = Path(directory)
        self.lora_dirs = [Path(d) for d in lora_dirs]
        self.active: LoraSet = ()
        self.last_switch_seconds = 0.0
        self._weight_map: WeightMap | None = None
        self._files: OrderedDict[tuple[str, int, int], Lora] = OrderedDict()
        self._failed: OrderedDict[tuple[str, int, int], str] = OrderedDict()  # files that did not read: why
        self._outside: set[Path] = set()  # listed symlinks that lead out of their directory (logged once each)
        self._files_lock = threading.Lock()  # a service checks requests on its event loop while the worker switches
        self._base: dict[tuple[str, str], torch.Tensor] = {}  # (component, weight) -> base value, kept on first touch
        for d in self.lora_dirs:
            if not d.is_dir():
                raise InvalidRequestError(f"LoRA directory {d} does not exist", param="lora_dir")

    # ------------------------------------------------------------------ names and files
    def available(self) -> dict[str, Path]:
        """LoRA names a request may use, from the directories' listings (``NAME.safetensors``; names in Unicode
        NFC, as clients type them), each file resolving inside its directory."""
        found: dict[str, Path] = {}
        for d in self.lora_dirs:
            root = d.resolve()
            for f in sorted(d.iterdir()):
                if f.suffix == LORA_FILE_SUFFIX and f.is_file():
                    if not f.resolve().is_relative_to(root):
                        if f not in self._outside:
                            self._outside.add(f)
                            log.warning("LoRA %s is left out: it resolves to %s, outside %s", f, f.resolve(), root)
                        continue
                    found.setdefault(unicodedata.normalize("NFC", f.stem), f)
        return found

    def resolve(self, name: str, *, allow_paths: bool = True) -> Path:
        """A LoRA name from the listing (its real path, checked inside its directory again), or
        (``allow_paths``) an existing file path."""
        listing = self.available()
        listed = listing.get(unicodedata.normalize("NFC", name)) if isinstance(name, str) else None
        if listed is not None:
            real = listed.resolve()
            if any(real.is_relative_to(d.resolve()) for d in self.lora_dirs):
                return real
            log.warning("LoRA %s now resolves to %s, outside the LoRA directories: refused", listed, real)
        elif allow_paths and Path(name).expanduser().is_file():
            return Path(name).expanduser()
        names = ", ".join(listing) or "none (start with --lora-dir DIR)"
        raise InvalidRequestError(f"unknown LoRA {name!r}; available: {names}", param="loras")

    def weight_map(self) -> WeightMap:
        if self._weight_map is None:
            try:
                self._weight_map = WeightMap.load(self.directory / WEIGHT_MAP_NAME)
            except ManifestError as e:  # engines from before weight maps: the request is what cannot be served
                raise InvalidRequestError(f"{e}: {self.ctx.manifest.rebuild_hint(self.directory)}",
                                          param="loras") from None
        return self._weight_map

    def read(self, path: Path) -> Lora:
        """The canonical LoRA of ``path`` for this model (cached by path, size and mtime; thread-safe)."""
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        with self._files_lock:
            return self._read_locked(path, key)

    def _read_locked(self, path: Path, key: tuple[str, int, int]) -> Lora:
        from sdxl_trt.lora.reading import read_lora

        lora = self._files.get(key)
        if lora is None:
            failed = self._failed.get(key)
            if failed is not None:  # the same file (path, size, mtime) failed before: not read again
                raise InvalidRequestError(failed, param="loras")
            wm = self.weight_map()
            targets = {c: {n: w.shape for n, w in cw.weights.items()} for c, cw in wm.components.items()}
            try:
                lora = read_lora(path, targets=targets)
            except LoraError as e:
                why = str(e).replace(str(path), path.name)
                self._failed[key] = why
                while len(self._failed) > 4 * self.FILES_KEPT:
                    self._failed.popitem(last=False)
                raise InvalidRequestError(why, param="loras") from None
            self._files[key] = lora
            while len(self._files) > self.FILES_KEPT:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        return lora

    def read_set(self, loras: LoraSet, *, allow_paths: bool = True) -> list[tuple[Lora, float]]:
        """Resolve and read every LoRA of a set, refusing names, files and engines that cannot take it (an
        unknown name, a bad file, a component these engines lack, an INT8 engine): before any work."""
        out = [(self.read(self.resolve(name, allow_paths=allow_paths)), scale) for name, scale in loras]
        for lora, _ in out:
            for component, layers in lora.layers.items():
                if not layers:
                    continue
                if component not in self.ctx.engines:
                    raise InvalidRequestError(f"LoRA {Path(lora.path).name} changes {component}, which these engines "
                                              "lack", param="loras")
                precision = self.ctx.manifest.components[component].precision
                if precision in ("int8", "fp8"):
                    raise InvalidRequestError(
                        f"LoRA {Path(lora.path).name}: the {component} engine is {precision.upper()}, whose quantization was "
                        "calibrated for its weights; fuse the LoRA at build instead: "
                        f"{self.ctx.manifest.rebuild_hint(self.directory)} --lora {lora.path}", param="loras")
        return out

    # ------------------------------------------------------------------ switching
    def activate(self, loras: LoraSet, *, allow_paths: bool = True) -> float:
        """Make ``loras`` the engines' weights (a no-op when already active); returns the seconds it took."""
        if loras == self.active:
            return 0.0
        t0 = time.perf_counter()
        new = self.read_set(loras, allow_paths=allow_paths)
        old = self.read_set(self.active) if self.active else []
        wm = self.weight_map()
        for component in self.ctx.engines:
            if component not in wm.components:
                continue
            cw = wm.components[component]
            # Every weight the old or the new set touches gets base + the new set's deltas (the old set's
            # weights go back to base); a weight no output reads (pruned at export) changes nothing.
            touched = sorted({n for lora, _ in (*new, *old) for n in lora.layers.get(component, {})
                              if not cw.weights[n].unused})
            engine: Any = self.ctx.engines[component]
            if engine.backend == "onnxruntime" and engine.has_weights(loras):
                engine.set_weights(loras, {})  # a kept session already holds this set: nothing to compute
            elif touched:
                self._push(component, cw, self._base_values(component, cw, touched), new, key=loras)
        if self.ctx.device.type == "cuda":
            torch.cuda.current_stream(self.ctx.device).synchronize()  # switch time is device time too
        self.active = loras
        self.last_switch_seconds = time.perf_counter() - t0
        log.info("LoRA set %s active in %.3f s", [f"{n}:{s:g}" for n, s in loras] or "none",
                 self.last_switch_seconds)
        return self.last_switch_seconds

    def _base_values(self, component: str, cw: ComponentWeights, names: list[str]) -> dict[str, torch.Tensor]:
        """The weights without any LoRA, torch layout, read from the engine before its first change and kept
        (on the engine's device for torch engines; on the host for ONNX-based ones)."""
        missing = [n for n in names if (component, n) not in self._base]
        if missing:
            engine: Any = self.ctx.engines[component]
            if engine.backend == "torch":
                weights = engine.weights()
                read = {n: weights[cw.weights[n].torch].detach().clone() for n in missing}
            else:  # the ONNX is read once: keep every LoRA-able weight of it
                read = base_weights_from_onnx(cw, self._onnx_initializers(component), list(cw.weights))
            for n, value in read.items():
                # Kept in float32 whatever the engine's dtype: deltas are added in fp32 and the sum is rounded
                # once, to the plan's dtype (an fp16 plan gets fp16(base + delta), never fp16 + fp16 delta).
                self._base[(component, n)] = value.reshape(cw.weights[n].shape).float().clone()
        return {n: self._base[(component, n)] for n in names if (component, n) in self._base}

    def _onnx_initializers(self, component: str) -> dict[str, torch.Tensor]:
        """The component's LoRA-able ONNX initializers (read once from the ONNX its engine came from)."""
        import onnx
        from onnx import numpy_helper

        engine: Any = self.ctx.engines[component]
        path = Path(engine.path) if engine.backend == "onnxruntime" else export_onnx_path(self.directory, component)
        wanted = {w.onnx for w in self.weight_map().components[component].weights.values() if w.onnx}
        model = onnx.load(str(path), load_external_data=True)
        return {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer
                if i.name in wanted}

    def _push(self, component: str, cw: ComponentWeights, base: dict[str, torch.Tensor],
              new: list[tuple[Lora, float]], *, key: LoraSet) -> None:
        engine: Any = self.ctx.engines[component]
        if engine.backend == "torch":
            values = {**base, **merged_weights(base, component, new)}
            engine.set_weights({cw.weights[n].torch: v for n, v in values.items()})
            return
        try:
            updates = onnx_weight_updates(cw, component, base, new)
        except LoraError as e:
            raise InvalidRequestError(str(e), param="loras") from None
        for n, value in base.items():  # weights only the old set touched go back to base
            loc = cw.weights[n]
            if loc.onnx is not None and loc.onnx not in updates:
                updates[loc.onnx] = value.T.contiguous() if loc.onnx_transposed else value
        # Each array in its weight's ONNX (= plan) dtype, recorded in the weight map at export.
        dtypes = {loc.onnx: loc.onnx_dtype for loc in cw.weights.values() if loc.onnx is not None}
        arrays = {name: np.ascontiguousarray(v.detach().cpu().numpy().astype(dtypes.get(name, "float32")))
                  for name, v in updates.items()}
        if engine.backend == "onnxruntime":
            engine.set_weights(key, arrays)
        else:
            engine.set_weights(arrays, rebuild=f"{self.ctx.manifest.rebuild_hint(self.directory)} --refittable")
            # A refit changes weights under the graphs that enqueue this engine: capture them again.
            self.ctx.graphs.invalidate({component})
