"""The weight map at work: an ONNX Runtime session of the *base* export, its initializers overridden with the
updates :mod:`sdxl_trt.lora.apply` computes through ``weight_map.json``, computes what the PyTorch modules with
the LoRAs fused compute, for each LoRA component, and A -> B from the kept base equals B alone.

This is the path a runtime switch will take on ONNX Runtime (initializer overrides) and TensorRT (refit by
the same names); here it proves the map's names and transposes are right. ONNX Runtime sessions that take
overrides must not use ORT_ENABLE_ALL on the CPU: it drops overrides of Conv weights (see ``_run``). Reference: the tiny modules
plus the ground-truth deltas from tests/support/lora_files.py. Tolerance: ONNX Runtime vs PyTorch kernels
(~1e-6 relative, as the export check finds), 1e-4 relative L2.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from support import lora_files as lf

from sdxl_trt.contracts import component_specs
from sdxl_trt.export.loading import model_dims
from sdxl_trt.export.onnx_export import sample_inputs
from sdxl_trt.export.wrappers import wrap_components
from sdxl_trt.lora import LoraError, lora_weight_shapes
from sdxl_trt.lora.apply import base_weights_from_onnx, onnx_weight_updates
from sdxl_trt.lora.reading import read_lora
from sdxl_trt.lora.weight_map import ComponentWeights, WeightLocation, WeightMap

COMPONENTS = ("text_encoder", "text_encoder_2", "unet")


@pytest.fixture(scope="module")
def exported(tiny_engines):
    """The base export's ONNX files and weight map: the shared tiny build's (its ONNX Runtime engines are the
    export's fp32 files). Read only."""
    return tiny_engines


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_models):
    base = tiny_models[0]
    shapes = lora_weight_shapes({"unet": base.unet, "text_encoder": base.text_encoder,
                                 "text_encoder_2": base.text_encoder_2})
    d = tmp_path_factory.mktemp("loras")
    ta = lf.write_kohya_lora(d / "a.safetensors", shapes, alpha=2.0, std=0.1, seed=7)
    tb = lf.write_diffusers_lora(d / "b.safetensors", shapes, std=0.1, seed=8)
    read = {k: read_lora(d / f"{k}.safetensors", targets=shapes, unet_config=base.unet.config) for k in ("a", "b")}
    return read, {"a": ta, "b": tb}


def _fused_wrapper(base, truths, component):
    mods = {"unet": copy.deepcopy(base.unet), "text_encoder": copy.deepcopy(base.text_encoder),
            "text_encoder_2": copy.deepcopy(base.text_encoder_2)}
    with torch.no_grad():
        for truth, scale in truths:
            params = dict(mods[component].named_parameters())
            for name, delta in truth.get(component, {}).items():
                params[name].add_((scale * delta).float())
    fused = copy.copy(base)
    fused.unet, fused.text_encoder, fused.text_encoder_2 = mods["unet"], mods["text_encoder"], mods["text_encoder_2"]
    return wrap_components(fused)[component]


def _run(path, component, inputs, overrides):
    so = ort.SessionOptions()
    # At ORT_ENABLE_ALL (the default) the CPU provider's layout transform (NCHWc) packs Conv weights from the
    # model's own initializers and add_initializer overrides of Conv weights are silently lost (ONNX Runtime
    # 1.32, measured: conv_in zeroed changes nothing); MatMul/Gemm overrides apply. EXTENDED keeps all of them.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    keep = []
    for name, value in overrides.items():
        v = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()))
        keep.append(v)
        so.add_initializer(name, v)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in inputs.items()})


def _rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


@pytest.mark.parametrize("component", COMPONENTS)
def test_onnx_overrides_from_the_weight_map_equal_fused_pytorch(exported, loras, tiny_models, component):
    base = tiny_models[0]
    read, truths = loras
    wm = WeightMap.load(exported / "weight_map.json")
    cw = wm.components[component]
    path = exported / f"{component}.onnx"
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(str(path)).graph.initializer}
    spec = component_specs(model_dims(base))[component]
    inputs = sample_inputs(spec, {"B": 2, "S": 77, "h": 32, "w": 32}, torch.float32, seed=4)
    ordered = [inputs[n] for n in spec.input_names]
    base_w = base_weights_from_onnx(cw, inits, list(cw.weights))
    plain = _run(path, component, inputs, {})
    # A, then B from the kept base (not from A's weights), then both stacked.
    for sets in ([("a", 0.7)], [("b", -1.1)], [("a", 0.7), ("b", 0.4)]):
        updates = onnx_weight_updates(cw, component, base_w, [(read[k], s) for k, s in sets])
        assert updates and all(name in inits and updates[name].shape == inits[name].shape for name in updates)
        ours = _run(path, component, inputs, updates)
        with torch.inference_mode():
            want = _fused_wrapper(base, [(truths[k], s) for k, s in sets], component)(*ordered)
        want = (want,) if isinstance(want, torch.Tensor) else want
        for o, w, p in zip(ours, want, plain, strict=True):
            assert _rel(o, w.numpy()) < 1e-4, (component, sets)
            assert _rel(p, w.numpy()) > 1e-3, (component, sets)  # the LoRA does change the output


def test_a_weight_without_an_initializer_of_its_own_is_refused(loras):
    read, _ = loras
    name = next(iter(read["a"].layers["unet"]))
    cw = ComponentWeights(weights={name: WeightLocation(shape=(1,), torch=f"unet.{name}", onnx=None)})
    with pytest.raises(LoraError, match="holds no weight of its own.*sdxl-trt build --lora"):
        onnx_weight_updates(cw, "unet", {}, [(read["a"], 1.0)])
