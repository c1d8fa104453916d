"""``sdxl-trt bench``: the end-to-end benchmark over a built engine directory, with diffusers as a baseline.

An entry point above every stage, like the CLI: it may import runtime/ (and, lazily, export/ and diffusers
for the baseline); no stage imports it. Modules:

- :mod:`.measure`: device-synchronised timers and per-pipeline memory probes;
- :mod:`.runner`: the benchmark itself (:class:`BenchOptions`, :func:`run_bench`);
- :mod:`.baseline`: diffusers' SDXL pipelines on the same weights (imported only with ``--baseline``);
- :mod:`.report`: JSON, Markdown and the optional plot.
"""

from __future__ import annotations

__all__ = ["BenchOptions", "run_bench"]


def __getattr__(name: str) -> object:  # a lazy re-export keeps `import sdxl_trt.bench` free of torch
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
