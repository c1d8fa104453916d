"""benchmarks/load_bench.py (load) and load_report.py (statistics, report) against a spawned tiny server: the
report's fields, and every accepted request answered with complete images. One server with a one-request queue, so the second level overloads it."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "load_bench.py"


@pytest.fixture(scope="module")
def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("load_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_bench"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def load_report(load_bench: ModuleType) -> ModuleType:
    """The report side, imported by load_bench from beside it."""
    return sys.modules["load_report"]


def _png_b64(size: tuple[int, int], *, truncate: bool = False) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, format="PNG")
    raw = out.getvalue()
    return base64.b64encode(raw[: len(raw) // 2] if truncate else raw).decode()


def test_check_images_refuses_what_a_client_could_not_use(load_bench: ModuleType) -> None:
    spec = load_bench.RequestSpec(size="256x128", n=1)
    assert load_bench.check_images({"data": [{"b64_json": _png_b64((256, 128))}]}, spec) is None
    assert "decode" in load_bench.check_images({"data": [{"b64_json": _png_b64((256, 128), truncate=True)}]}, spec)
    assert "asked for 256x128" in load_bench.check_images({"data": [{"b64_json": _png_b64((128, 128))}]}, spec)
    assert "asked for 1" in load_bench.check_images({"data": []}, spec)
    assert "decode" in load_bench.check_images({"data": [{"b64_json": "not base64!"}]}, spec)


def test_percentiles_and_metrics_parsing(load_report: ModuleType) -> None:
    assert load_report.percentile([], 0.5) is None
    assert load_report.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert load_report.percentile([float(v) for v in range(1, 101)], 0.99) == 99.0
    m = load_report.parse_metrics('# HELP x\nsdxl_trt_queue_depth 3.0\n'
                                 'sdxl_trt_requests_total{endpoint="/v1/images/generations",outcome="ok"} 7.0\n')
    assert m["sdxl_trt_queue_depth"] == 3.0
    assert load_report._requests_by_outcome(m) == {"ok": 7.0}


@pytest.mark.slow
def test_against_a_spawned_server(load_bench: ModuleType, tiny_engines: Path, tmp_path: Path) -> None:
    rc = load_bench.main([
        "--spawn-engines", str(tiny_engines), "--server-args", "--max-queue 1 --batch-window-ms 5 --warmup none",
        "--concurrency", "1,6", "--duration-s", "3", "--steps", "2", "--warmup", "1", "--max-backoff-s", "0.2",
        "--in-process-engines", str(tiny_engines), "--in-process-runs", "2", "--out", str(tmp_path), "--name", "smoke",
    ])
    assert rc == 0
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.md").read_text().startswith("# sdxl-trt load benchmark: tiny")
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert report["model"] == "tiny" and report["environment"]["device"]
    one, many = report["levels"]
    for level in (one, many):
        assert level["requests"] > 0 and level["all_accepted_complete"]
        assert level["transport_errors"] == 0 and level["server_5xx"] == 0, level["outcomes"]
        assert set(level["latency_s"]) >= {"p50", "p90", "p99"} and level["latency_s"]["p50"] > 0
        assert level["images_per_s"] > 0 and level["queue_depth"]["samples"] > 0
        assert level["server"]["mean_batch_size"] >= 1
        assert level["server"]["pipeline_s_per_batch"] > 0 and level["server"]["app_s_per_answer"] > 0
        # The server answered exactly what the clients saw: no accepted request was lost on the way.
        assert level["server"]["requests_by_outcome"].get("ok") == level["outcomes"]["ok"]
    assert set(one["outcomes"]) == {"ok"}
    # Six clients against one queue slot and a batch of two: refused at once, never an error or a hang.
    assert many["outcomes"].get("429", 0) > 0, many["outcomes"]
    assert many["server"]["requests_by_outcome"].get("overloaded") == many["outcomes"]["429"]
    assert many["refusal_latency_s_p50"] < 0.5
    paired = report["in_process"]
    assert paired["runs"] == 2 and paired["in_process"]["p50_s"] > 0 and paired["server_c1"]["p50_s"] > 0
    assert isinstance(paired["overhead_s_p50"], float)
