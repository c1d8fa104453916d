"""An engine directory's manifest as a person reads it: ``sdxl-trt info`` and the table ``sdxl-trt build``
prints. Beside the manifest on the ground floor, so reading a directory never imports the builder."""

from __future__ import annotations

import json

from sdxl_trt.contracts import controlnet_names, shallow_branches
from sdxl_trt.tables import format_table, human_bytes

from .manifest import Manifest


def format_build_table(manifest: Manifest) -> str:
    rows = [("component", "backend", "precision", "profiles", "size", "build s", "export rel. error")]
    for name, e in manifest.components.items():
        err = max(e.export_error.values()) if e.export_error else float("nan")
        rows.append((name, manifest.backend, e.precision, str(len(e.profiles)), human_bytes(e.size_bytes),
                     f"{e.build_seconds:.1f}", f"{err:.2e}"))
    return format_table(rows)


def format_manifest(manifest: Manifest) -> str:
    """``sdxl-trt info``: the manifest as a person reads it."""
    m = manifest
    dev = m.device
    lines = [
        f"model:      {m.model.get('name')} ({m.model.get('kind')}, hash {str(m.model.get('identity_hash'))[:12]})",
        *([f"refiner:    {m.refiner.get('name')} (hash {str(m.refiner.get('identity_hash'))[:12]})"] if m.refiner else []),
        *[f"LoRA:       {lo['path']} (scale {lo['scale']:g}, sha256 {lo['sha256'][:12]}"
          + (f", {lo.get('kind', 'LoRA')} in {lo['format']} keys, "
             + ", ".join(f"{c} {n} layers" for c, n in lo['layers'].items()) if 'layers' in lo else "")
          + ")" for lo in m.model.get("loras", [])],
        f"backend:    {m.backend}   precision: {m.precision}   profiles: {m.profile_mode}",
        f"buckets:    {', '.join(m.buckets)}",
        f"max batch:  {m.max_batch} images   prompt chunks: {m.max_prompt_chunks} (x 75 tokens)",
        f"built on:   {dev.get('name')} ({dev.get('type')}"
        + (f", compute capability {dev['compute_capability']})" if dev.get("compute_capability") else ")"),
        f"versions:   {json.dumps(m.versions)}",
        f"created:    {m.created}",
        f"command:    {m.build_command}",
        *([f"step cache: branches {', '.join(map(str, shallow_branches(m.components)))} (shallow UNets "
           f"{', '.join(c for c in m.components if c.startswith('unet_shallow.'))}; requests: cache_interval N, "
           "cache_branch K)"] if shallow_branches(m.components) else []),
        "",
        format_build_table(m),
    ]
    for name, e in m.components.items():
        cn = e.extra.get("controlnet")
        if cn:
            src = cn["source"]
            cfg = cn["config"]
            lines.insert(lines.index(""), f"ControlNet: {controlnet_names([name])[0]} from {src.get('name') or src.get('path')} "
                         f"({src['type']}, hash {cn['identity_hash'][:12]}, channels {cfg['block_out_channels']}, "
                         f"transformer layers {cfg['transformer_layers_per_block']})")
    for name, e in m.components.items():
        err = (e.extra.get("int8") or {}).get("error")
        if err:
            lines.append(f"\n{name} int8 vs fp32 (held-out prompts): noise_pred relative L2 {err['relative_l2_mean']:.4f} "
                         f"(max {err['relative_l2_max']:.4f}), cosine {err['cosine_mean']:.5f}")
    return "\n".join(lines)
