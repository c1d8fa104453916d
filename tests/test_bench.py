"""`sdxl-trt bench` on tiny CPU engines: the report's fields, the diffusers baseline rows, the per-step
denominators of a refiner row, and a machine without matplotlib.

One benchmark run (module fixture) serves the field checks; it is small (5 steps, 2 runs, one size) because
these tests check what is reported, not how fast anything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdxl_trt.cli import main

STEPS = 5


@pytest.fixture(scope="module")
def bench_report(tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    rc = main(["-q", "bench", "--engines", str(tiny_engines), "--out", str(out), "--baseline", "tiny",
               "--refiner-mode", "ensemble", "--sizes", "256x256", "--steps", str(STEPS), "--runs", "2",
               "--warmup-runs", "0", "--batches", "1,2", "--name", "r"])
    assert rc == 0
    return out, json.loads((out / "r.json").read_text())


def test_cli_writes_json_markdown_and_plot_with_every_field(bench_report: tuple[Path, dict]) -> None:
    out, report = bench_report
    assert (out / "r.md").exists() and (out / "r.png").stat().st_size > 0
    for key in ("settings", "environment", "engines", "pipelines", "rows", "throughput", "reference",
                "timing_method", "stage_timers", "notes"):
        assert key in report, key
    assert [(r["size"], r["pipeline"]) for r in report["rows"]] == [("256x256", "base"),
                                                                     ("256x256", "refiner-ensemble")]
    for row in report["rows"]:
        ours = row["sdxl_trt"]
        assert ours["runs"] == 2 and ours["min_s"] <= ours["p50_s"] <= ours["p90_s"]
        assert {"text_encoders", "denoise", "vae_decode"} <= set(ours["stages_s"])
        assert ours["step_ms"]["base"] > 0
    base = report["rows"][0]["sdxl_trt"]
    assert base["step_ms_events"] is not None and base["step_split_steps"] == [STEPS, STEPS // 2]
    ours_p = report["pipelines"]["sdxl_trt"]
    assert ours_p["load_s"] > 0 and ours_p["warmup_s"] > 0
    assert set(ours_p["memory"]) >= {"peak_reserved_gib", "peak_allocated_gib", "device_used_gib"}
    assert ours_p["memory"]["peak_reserved_gib"] is None  # CPU: not measured, never a process-wide figure
    assert [(t["size"], t["batch"]) for t in report["throughput"]] == [("256x256", 1), ("256x256", 2)]
    for t in report["throughput"]:
        assert t["sdxl_trt"]["images_per_s"] > 0 and t["diffusers"]["images_per_s"] > 0
    md = (out / "r.md").read_text()
    assert "| 256x256 | base |" in md and "| 256x256 | refiner-ensemble |" in md and "Throughput" in md


def test_baseline_rows_and_fp32_reference(bench_report: tuple[Path, dict]) -> None:
    _, report = bench_report
    assert report["pipelines"]["diffusers"]["load_s"] > 0
    assert "StableDiffusionXLPipeline" in report["pipelines"]["diffusers"]["description"]
    # fp32 engines on the CPU: the reference is the fp32 diffusers baseline itself, and the report says so.
    assert report["reference"]["kind"] == "diffusers-fp32-baseline"
    for row in report["rows"]:
        d = row["diffusers"]
        assert d["runs"] == 2 and d["p50_s"] > 0
        assert row["speedup_p50"] == pytest.approx(d["p50_s"] / row["sdxl_trt"]["p50_s"])
        # Same weights, seeds and scheduler in fp32: rounding only (about 5e-5). A wrong seed, scheduler or
        # refiner split moves pixels by tens of levels, an error above 0.05.
        assert row["error_vs_fp32"]["sdxl_trt"] < 2e-3
        assert row["error_vs_fp32"]["diffusers"] == 0.0


def test_step_ms_denominators_on_a_refiner_row(bench_report: tuple[Path, dict], tiny_engines: Path) -> None:
    """Base time over base steps, refiner time over refiner steps; the split is diffusers' own rule."""
    from diffusers import EulerDiscreteScheduler

    _, report = bench_report
    sched = EulerDiscreteScheduler.from_config(
        json.loads((tiny_engines / "scheduler" / "scheduler_config.json").read_text()))
    sched.set_timesteps(STEPS)
    cutoff = int(round(sched.config.num_train_timesteps * (1 - 0.8)))  # diffusers' denoising_end rule
    base_steps = sum(1 for t in sched.timesteps if t >= cutoff)
    assert 0 < base_steps < STEPS

    base_row, ref_row = report["rows"]
    assert base_row["sdxl_trt"]["steps"] == {"base": STEPS, "refiner": 0}
    assert base_row["sdxl_trt"]["step_ms"]["refiner"] is None
    ours = ref_row["sdxl_trt"]
    assert ours["steps"] == {"base": base_steps, "refiner": STEPS - base_steps}
    assert ours["step_ms"]["base"] == pytest.approx(1000 * ours["stages_s"]["denoise"] / base_steps)
    assert ours["step_ms"]["refiner"] == pytest.approx(1000 * ours["stages_s"]["refiner"] / (STEPS - base_steps))


def test_no_matplotlib_still_writes_json_and_markdown_and_exits_0(tiny_engines: Path, tmp_path: Path) -> None:
    """A GPU machine without matplotlib must not lose the run: the import is blocked in a fresh process."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class NoMatplotlib(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "matplotlib" or name.startswith("matplotlib."):
                    raise ImportError("blocked for the test: " + name)
                return None
        sys.meta_path.insert(0, NoMatplotlib())
        from sdxl_trt.cli import main
        sys.exit(main(["bench", "--engines", {str(tiny_engines)!r}, "--out", {str(tmp_path)!r}, "--steps", "2",
                       "--runs", "1", "--warmup-runs", "0", "--no-step-split", "--name", "nomp"]))
    """)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "matplotlib is not installed" in proc.stderr
    report = json.loads((tmp_path / "nomp.json").read_text())
    assert report["rows"][0]["diffusers"] is None and report["reference"]["kind"] is None
    assert (tmp_path / "nomp.md").exists() and not (tmp_path / "nomp.png").exists()


def test_unbuilt_size_is_refused_with_the_built_list(tiny_engines: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["-q", "bench", "--engines", str(tiny_engines), "--out", str(tmp_path), "--sizes", "1024x1024"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "1024x1024" in err and "256x256" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
def test_memory_probe_counts_one_pipeline_alone_on_cuda() -> None:
    """What was resident before start() is not counted; what the measured code allocates is."""
    import torch

    from sdxl_trt.bench.measure import MemoryProbe

    dev = torch.device("cuda")
    resident = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)  # the "previous pipeline"
    probe = MemoryProbe(dev).start()
    x = torch.empty(512 * 2**20, dtype=torch.uint8, device=dev)
    probe.sample()
    del x
    r = probe.result()
    assert 0.49 <= r["peak_allocated_gib"] <= 0.51, r
    assert r["peak_reserved_gib"] >= 0.49 and r["device_used_gib"] >= 0.49, r
    assert r["start_reserved_gib"] >= 0.25, r
    del resident


@pytest.mark.gpu
def test_timed_waits_for_the_device() -> None:
    """Host clocks without a sync see only the launches; timed() must see the work (CUDA events)."""
    import time

    import torch

    from sdxl_trt.bench.measure import timed

    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev)

    def work() -> None:
        for _ in range(50):
            a @ a

    work()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    work()
    torch.cuda.synchronize()
    synced = time.perf_counter() - t0
    t, _ = timed(work, dev)
    assert 0.5 * synced <= t <= 2.0 * synced, (t, synced)


def test_unknown_baseline_is_refused_before_any_timing(tiny_engines: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["-q", "bench", "--engines", str(tiny_engines), "--out", str(tmp_path), "--baseline", "sdxl-bsae-1.0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "sdxl-bsae-1.0" in err and "sdxl-base-1.0" in err
    assert not list(tmp_path.iterdir())


def test_cache_interval_times_step_caching_against_deepcache_on_diffusers(
        tiny_deepcache_engines: Path, tmp_path: Path) -> None:
    """``--cache-interval 3 --cache-branch 1``: the timed requests run step caching and the baseline runs
    diffusers under DeepCacheSDHelper at the same interval and branch: our image equals it (fp32: rounding only),
    while caching itself moves diffusers' image far more, so an uncached baseline would fail the bound."""
    import torch

    from sdxl_trt.bench.baseline import load_diffusers, relative_error
    from sdxl_trt.buckets import Bucket

    rc = main(["-q", "bench", "--engines", str(tiny_deepcache_engines), "--out", str(tmp_path), "--baseline", "tiny",
               "--cache-interval", "3", "--cache-branch", "1", "--steps", "3", "--runs", "1", "--warmup-runs", "0",
               "--no-step-split", "--name", "c"])
    assert rc == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["settings"]["cache_interval"] == 3 and report["engines"]["cache_branch"] == 1
    assert report["engines"]["cache_branches"] == [0, 1, 3]
    assert "DeepCacheSDHelper (interval 3, branch 1)" in report["reference"]["description"]
    assert "step caching: interval 3, branch 1" in (tmp_path / "c.md").read_text()
    err = report["rows"][0]["error_vs_fp32"]["sdxl_trt"]
    dp = load_diffusers("tiny", refiner=None, dtype=torch.float32, device=torch.device("cpu"), scheduler="euler")
    kw = dict(prompt=report["settings"]["prompt"], bucket=Bucket.parse("256x256"), steps=3, guidance=5.0, seed=0,
              n=1, refiner_mode=None, refiner_start=0.8, refiner_strength=0.3)
    caching_moves = relative_error(dp.generate(**kw), dp.generate(**kw, cache_interval=3, cache_branch=1))
    assert err < 2e-3 and caching_moves > 5 * err, (err, caching_moves)


@pytest.mark.parametrize(("flags", "named"), [(["--cache-interval", "2", "--cache-branch", "2"], "0, 1, 3"),
                                              (["--cache-interval", "9", "--steps", "4"], "--steps (4)")])
def test_bad_cache_flags_are_refused_before_any_timing(tiny_deepcache_engines: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str], flags: list[str],
                                                       named: str) -> None:
    rc = main(["-q", "bench", "--engines", str(tiny_deepcache_engines), "--out", str(tmp_path), *flags])
    assert rc == 2
    err = capsys.readouterr().err
    assert named in err and flags[1] in err
    assert not list(tmp_path.iterdir())
