"""A torch engine's file: a saved ``torch.export`` program, loaded (and optionally compiled) one way.

The build verifies each program and compiles its bucket shapes to store Inductor's cache artifacts; the
runtime loads the same file to serve. Both go through :func:`load_program`, because the compile cache only
hits when the graph and the compile options are exactly the ones a service uses.

Imports torch and the contracts only: a saved program is an ATen graph plus weights, so loading it needs
neither diffusers nor transformers (tests/test_torch_backend.py checks that in a subprocess).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdxl_trt.contracts import ComponentSpec
from sdxl_trt.errors import ManifestError

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 256
"""Static shapes one compiled engine may hold (torch's default, 8, would silently fall back to eager after
8 (bucket, batch) shapes: 9 SDXL buckets times 4 batch sizes is 36)."""


@dataclass
class LoadedProgram:
    """A program on its device: the callable module and the dtypes of its contract's inputs and outputs."""

    module: torch.nn.Module
    input_dtypes: dict[str, torch.dtype]
    output_dtypes: dict[str, torch.dtype]
    compiled: bool
    weights: dict[str, torch.Tensor]  # parameters and buffers by name, the tensors the module reads
    # the parsed program this module came from; while any module holds it, a new load of the same file reuses it
    program: torch.export.ExportedProgram | None = field(default=None, repr=False)
    _parsed_key: tuple[str, int, int, str] | None = field(default=None, repr=False)

    def before_weights_change(self) -> None:
        """Call before changing :attr:`weights` in place. A first load's weights are the parsed program's own, the
        ones a later load of the file would copy; from now on a later load parses the file again instead."""
        if self._parsed_key is not None:
            _forget_parsed(self._parsed_key, self.program)
            self._parsed_key = None

    def __call__(self, spec: ComponentSpec, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The program's outputs, in the contract's order, for inputs named as in the contract."""
        with torch.inference_mode():
            result = self.module(*(inputs[n] for n in spec.input_names))
        return (result,) if isinstance(result, torch.Tensor) else tuple(result)


def load_program(
    path: str | Path,
    spec: ComponentSpec,
    *,
    device: str | torch.device,
    compile: bool = False,
    cache_artifacts: str | Path | None = None,
) -> LoadedProgram:
    """Load a ``.pt2`` engine onto ``device``; with ``compile``, wrap it in ``torch.compile`` (static shapes).

    ``cache_artifacts`` (the build's ``*.inductor-cache.bin``) is loaded into torch's compile caches
    first, so the shapes compiled at build time are cache hits here. It only pays with ``compile``.
    """
    path = Path(path)
    device = torch.device(device)
    if not path.is_file():
        raise ManifestError(f"{spec.name}: torch engine {path} does not exist; rebuild with --backend torch")
    t0 = time.perf_counter()
    key = _parsed_key(path, device)
    with _PARSED_LOCK:
        program = _PARSED.get(key)
    reused = program is not None
    if program is None:
        try:
            program = torch.export.load(str(path))
        except Exception as e:  # noqa: BLE001 - torch raises several types for a bad or foreign archive
            raise ManifestError(
                f"{spec.name}: {path} is not a loadable torch.export archive with torch {torch.__version__} "
                f"({type(e).__name__}: {e}); rebuild the engine with this torch"
            ) from e
        program = _on_device(program, device)
    input_dtypes, output_dtypes = _signature_dtypes(program, spec, path)
    module: torch.nn.Module = program.module()
    if reused:
        _own_weights(module)  # the first load's module may change its weights (LoRAs): this one starts from the file's
    else:
        with _PARSED_LOCK:
            _PARSED[key] = program
    weights = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    if compile:
        if cache_artifacts is not None:
            _load_cache_artifacts(Path(cache_artifacts), spec)
        _raise_recompile_limit(RECOMPILE_LIMIT)
        module = torch.compile(module, dynamic=False)
    elif cache_artifacts is not None:
        log.warning("%s: cache_artifacts %s ignored: compile=False", spec.name, cache_artifacts)
    log.info("loaded torch engine %s from %s in %.2f s (compile=%s%s)", spec.name, path, time.perf_counter() - t0,
             compile, ", parsed program reused" if reused else "")
    return LoadedProgram(module, input_dtypes, output_dtypes, compile, weights, program=program,
                         _parsed_key=None if reused else key)


# ------------------------------------------------------------------------------- parsed programs, per process
# Parsing a .pt2 is most of its load: torch rebuilds every node's symbolic shapes (sympy), 15 s of CPU for the tiny
# UNet's 1,860 nodes, against 1 s to make a module from the parsed program. A file loaded again while a module
# made from it lives (a second pipeline over the same engines, a benchmark's reload) reuses the parsed program and
# gets weights of its own, copied from the program's while those are still the file's: the first load's module
# shares them, so it calls ``before_weights_change`` before it changes them, and later loads parse again. Entries
# are weak: the last module going frees its program, as before.
_PARSED: weakref.WeakValueDictionary[tuple[str, int, int, str], torch.export.ExportedProgram] = (
    weakref.WeakValueDictionary())
_PARSED_LOCK = threading.Lock()


def _parsed_key(path: Path, device: torch.device) -> tuple[str, int, int, str]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(device))


def _forget_parsed(key: tuple[str, int, int, str], program: torch.export.ExportedProgram | None) -> None:
    with _PARSED_LOCK:
        if _PARSED.get(key) is program:
            del _PARSED[key]


def _own_weights(module: torch.nn.Module) -> None:
    """Give ``module`` copies of its parameters and buffers (tied names stay tied), so changing them in place
    touches no other module made from the same program."""
    copies: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in list(module.named_parameters(remove_duplicate=False)):
            owner_name, _, leaf = name.rpartition(".")
            if id(param) not in copies:
                copies[id(param)] = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            setattr(module.get_submodule(owner_name), leaf, copies[id(param)])
        for name, buf in list(module.named_buffers(remove_duplicate=False)):
            owner_name, _, leaf = name.rpartition(".")
            if id(buf) not in copies:
                copies[id(buf)] = buf.clone()
            module.get_submodule(owner_name)._buffers[leaf] = copies[id(buf)]


def _on_device(program: torch.export.ExportedProgram, device: torch.device) -> torch.export.ExportedProgram:
    """Move a program built on another device (weights and device constants in the graph) to ``device``."""
    tensors = [*program.state_dict.values(), *(v for v in program.constants.values() if isinstance(v, torch.Tensor))]
    if not tensors or all(t.device == device or (t.device.type == device.type and device.index is None)
                          for t in tensors):
        return program
    from torch.export.passes import move_to_device_pass

    log.info("moving torch engine from %s to %s", tensors[0].device, device)
    return move_to_device_pass(program, device)


def _signature_dtypes(
    program: torch.export.ExportedProgram, spec: ComponentSpec, path: Path
) -> tuple[dict[str, torch.dtype], dict[str, torch.dtype]]:
    """Check the program's user inputs and outputs against the contract; return their dtypes."""
    sig = program.graph_signature
    names = list(sig.user_inputs)
    if names != spec.input_names or len(sig.user_outputs) != len(spec.outputs):
        raise ManifestError(
            f"{spec.name}: {path} takes {names} and returns {len(sig.user_outputs)} tensors, but the contract "
            f"takes {spec.input_names} and returns {spec.output_names}; rebuild the engine"
        )
    nodes = {n.name: n for n in program.graph.nodes}
    input_dtypes = {name: nodes[name].meta["val"].dtype for name in names}
    output_node = next(n for n in reversed(program.graph.nodes) if n.op == "output")
    flat_outputs = output_node.args[0]
    user_outputs = flat_outputs[len(flat_outputs) - len(sig.user_outputs):]
    output_dtypes = {name: node.meta["val"].dtype for name, node in zip(spec.output_names, user_outputs, strict=True)}
    return input_dtypes, output_dtypes


def _load_cache_artifacts(path: Path, spec: ComponentSpec) -> None:
    if not path.is_file():
        raise ManifestError(f"{spec.name}: compile cache {path} does not exist; rebuild with compile shapes or omit it")
    info = torch.compiler.load_cache_artifacts(path.read_bytes())
    if info is None:
        log.warning("%s: %s holds no usable compile artifacts (another torch version?); compiling from scratch",
                    spec.name, path)
    else:
        log.info("%s: loaded compile cache %s (%s)", spec.name, path,
                 {kind: len(keys) for kind, keys in info.artifacts.items()})


def _raise_recompile_limit(limit: int) -> None:
    """Let one compiled module hold ``limit`` static shapes (only ever raises torch's process-wide limit)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < limit:
        setattr(cfg, name, limit)
    if hasattr(cfg, "accumulated_recompile_limit") and cfg.accumulated_recompile_limit < 4 * limit:
        cfg.accumulated_recompile_limit = 4 * limit
