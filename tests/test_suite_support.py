"""The suite's own machinery (tests/support/engine_cache.py): the shared engine cache's key covers everything a
build can read, one process builds while the others wait, and a shared directory that a test changed is caught.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from support import engine_cache
from test_layers import ROOT, _imports, _module_name, _project_files


def _build_closure() -> set[Path]:
    """Every project file the build's modules can import (each import statement, lazy ones included, followed
    from ``sdxl_trt.engine.build`` and the test helper that writes the ControlNet directory)."""
    modules = {_module_name(p): p for p in _project_files()}
    todo = [ROOT / "engine" / "build.py", ROOT / "tests" / "support" / "controlnet_files.py"]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for _, name in _imports(path):
            parts = name.split(".")
            for n in range(len(parts), 0, -1):  # `from pkg import name`: the module is pkg (or pkg.name)
                prefix = ".".join(parts[:n])
                if prefix in modules:
                    todo += [modules[".".join(parts[:k])] for k in range(1, n + 1) if ".".join(parts[:k]) in modules]
                    break
    return seen


def uncovered(key_files: list[Path]) -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in _build_closure() - set(key_files))


def test_the_cache_key_covers_every_module_a_build_can_import() -> None:
    closure = _build_closure()
    assert ROOT / "export" / "exporter.py" in closure and ROOT / "sdxl_trt" / "contracts.py" in closure
    assert uncovered(engine_cache.source_files()) == []


def test_the_coverage_check_sees_a_missing_file() -> None:
    """The check can fail: a key without the contracts (which export and engine both read) is reported."""
    files = [p for p in engine_cache.source_files() if p.name != "contracts.py"]
    assert "sdxl_trt/contracts.py" in uncovered(files)


def test_the_key_changes_with_the_build_code_and_not_with_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    key = engine_cache.cache_key()
    rel = {p.relative_to(ROOT).as_posix() for p in engine_cache.source_files()}
    assert "engine/build.py" in rel and "sdxl_trt/presets.py" in rel and "tests/support/controlnet_files.py" in rel
    assert not any(r.startswith(("runtime/", "serve/")) for r in rel)
    monkeypatch.setitem(engine_cache.RECIPES, "tiny", {**engine_cache.RECIPES["tiny"], "max_batch": 3})
    assert engine_cache.cache_key() != key


@pytest.fixture
def fake_builds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Builds that write two small files (slowly, so concurrent callers overlap), counted."""
    calls: list[str] = []

    def builder(name: str, key_dir: Path):
        def build(out: Path) -> None:
            calls.append(name)
            time.sleep(0.3)
            (out / "sub").mkdir(parents=True)
            (out / "a.onnx").write_bytes(b"engine")
            (out / "sub" / "b.json").write_text("{}")
        return build

    monkeypatch.setattr(engine_cache, "_builder", builder)
    monkeypatch.setattr(engine_cache, "_handed_out", {})
    monkeypatch.setenv(engine_cache.CACHE_ENV, str(tmp_path / "cache"))
    return calls


def test_concurrent_callers_build_once(fake_builds: list[str], tmp_path: Path) -> None:
    paths: list[Path] = []

    def take() -> None:
        engine_cache._handed_out.clear()  # as another process would see it
        paths.append(engine_cache.shared("fake", key_dir=tmp_path / "cache" / "k"))

    threads = [threading.Thread(target=take) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake_builds == ["fake"] and len(set(paths)) == 1 and (paths[0] / "a.onnx").read_bytes() == b"engine"


def test_a_write_into_a_shared_dir_is_caught_and_the_next_hand_out_rebuilds(fake_builds: list[str],
                                                                          tmp_path: Path) -> None:
    key_dir = tmp_path / "cache" / "k"
    out = engine_cache.shared("fake", key_dir=key_dir)
    (d,) = engine_cache.handed_out()
    assert d.changed_since_last_check() == [] and d.changed_contents() == []
    (out / "sub" / "b.json").write_text('{"x": 1}')  # what a careless test would do
    (out / "new.txt").write_text("")
    assert d.changed_since_last_check() == ["+new.txt", "~sub/b.json"]  # what the per-test check reports
    assert d.changed_since_last_check() == []  # reported once, at the test that did it
    assert d.changed_contents() == ["+new.txt", "~sub/b.json"]
    engine_cache._handed_out.clear()  # the next process
    assert engine_cache.shared("fake", key_dir=key_dir) == out
    assert fake_builds == ["fake", "fake"] and not (out / "new.txt").exists()



def test_the_files_grouped_on_one_worker_exist_and_read_the_held_programs() -> None:
    """conftest.SAME_WORKER names files by path: a renamed file would silently leave its group (and parse the torch
    programs again on another worker), a file that stopped reading ``tiny_torch_parsed`` would be grouped for
    nothing. Under ``--dist loadfile`` the scheduler gives each of them its group's unit, every other file its own."""
    import conftest

    class LoadfileConfig:  # what the hook and xdist's scheduler read of a `-n 2 --dist loadfile` run
        values = {"dist": "loadfile", "tx": ["2*popen"]}
        option = type("Option", (), {"loadscopereorder": True})

        def getoption(self, name: str, default: object = None) -> object:
            return self.values.get(name, default)

        getvalue = getoption

    assert len(set(conftest.SAME_WORKER.values())) == 1 < len(conftest.SAME_WORKER)
    assert all((ROOT / rel).is_file() for rel in conftest.COSTLIEST_FIRST), conftest.COSTLIEST_FIRST
    for rel in conftest.SAME_WORKER:
        assert "tiny_torch_parsed" in (ROOT / rel).read_text(encoding="utf-8"), rel
    scheduler = conftest.pytest_xdist_make_scheduler(LoadfileConfig(), None)
    units = {scheduler._split_scope(f"{rel}::test_x[a]") for rel in conftest.SAME_WORKER}
    assert units == set(conftest.SAME_WORKER.values())
    assert scheduler._split_scope("tests/test_pipeline.py::test_x") == "tests/test_pipeline.py"
    assert LoadfileConfig.option.loadscopereorder is False  # units go out in collection order, costliest first
    LoadfileConfig.values["dist"] = "load"
    assert conftest.pytest_xdist_make_scheduler(LoadfileConfig(), None) is None  # xdist's own scheduler
