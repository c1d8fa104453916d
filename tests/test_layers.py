"""The import rule (README "Layout"): stages import one way, export -> engine -> runtime -> serve, and all of
them read the ground floor (contracts, requests, the engine-directory format), which imports no stage.

Checked statically over every import statement (lazy ones inside functions included), and dynamically: a
service process that loads engines and answers a request has never imported ``sdxl_trt.export`` or
``sdxl_trt.engine``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"export": "export", "engine": "engine", "runtime": "runtime", "serve": "serve"}
ENTRY_POINTS = {"sdxl_trt.cli", "sdxl_trt.bench"}
"""Modules above every stage: they dispatch to stages (lazily, so `sdxl-trt --help` loads none of them)."""

FORBIDDEN = {
    "export": ("engine", "runtime", "serve"),
    "engine": ("runtime", "serve"),
    "runtime": ("export", "engine", "serve"),
    "serve": ("export", "engine"),
    "ground": ("export", "engine", "runtime", "serve"),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in STAGES:
        parts = ["sdxl_trt", STAGES[parts[0]], *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "sdxl_trt":
        return None
    if any(module == e or module.startswith(e + ".") for e in ENTRY_POINTS):
        return "entry"
    if len(parts) > 1 and parts[1] in STAGES.values():
        return parts[1]
    return "ground"


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """Every module ``path`` imports (its text, or ``source`` for a file not on disk), relative imports resolved
    to absolute names."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from sdxl_trt import engine` imports a module too: judge each imported name under its package.
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


def _project_files() -> list[Path]:
    files = [*sorted((ROOT / "sdxl_trt").rglob("*.py"))]
    for folder in STAGES:
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def _violations(extra: dict[Path, str] | None = None) -> list[str]:
    """Imports against the rule in the project's files and in ``extra`` (path -> source, never written)."""
    extra = extra or {}
    bad = []
    for path in [*_project_files(), *extra]:
        layer = _layer(_module_name(path))
        if layer in (None, "entry"):
            continue
        for lineno, name in _imports(path, extra.get(path)):
            target = _layer(name)
            if target in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{lineno} ({layer}) imports {name} ({target})")
    return bad


def test_stages_import_one_way() -> None:
    assert _violations() == []


def test_the_checker_sees_a_wrong_way_import() -> None:
    """The rule can fail: a runtime module importing the builder, lazily inside a function, is reported (the
    probe is given as text: no test writes into the checkout)."""
    fake = ROOT / "runtime" / "_layers_probe.py"
    source = "def f():\n    from sdxl_trt.engine.build import build_engines\n    from ..engine import x\n"
    found = [v for v in _violations({fake: source}) if "_layers_probe" in v]
    assert len(found) == 2 and all("(runtime) imports sdxl_trt.engine" in v for v in found), found


def test_engine_dir_is_not_mistaken_for_engine() -> None:
    assert _layer("sdxl_trt.engine_dir.manifest") == "ground"
    assert _layer("sdxl_trt.engine.build") == "engine"
    assert _layer("sdxl_trt.cli") == "entry"


@pytest.mark.slow
def test_a_service_never_imports_export_or_engine(tiny_engines: Path) -> None:
    """Load engines and answer a request through the real app (settings from the CLI's own parser) in a
    fresh process, then read ``sys.modules``."""
    script = textwrap.dedent(f"""
        import json, sys
        import httpx, anyio
        from sdxl_trt.cli import build_parser
        from sdxl_trt.cli.serve import settings_from_args
        from sdxl_trt.serve.http.app import create_app

        args = build_parser().parse_args(["serve", "--engines", {str(tiny_engines)!r}, "--device", "cpu",
                                          "--warmup", "256x256"])  # the warm-up path, on one bucket
        app = create_app(settings_from_args(args))

        async def main():
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as c:
                    for _ in range(600):
                        if (await c.get("/ready")).status_code == 200:
                            break
                        await anyio.sleep(0.1)
                    r = await c.post("/v1/images/generations",
                                     json={{"prompt": "a cat", "size": "256x256", "steps": 2, "seed": 1}})
                    assert r.status_code == 200, r.text
        anyio.run(main)
        print(json.dumps({{"project": sorted(m for m in sys.modules if m.startswith("sdxl_trt")),
                          "heavy": [m for m in ("diffusers", "onnx_graphsurgeon", "polygraphy", "onnxscript")
                                    if m in sys.modules]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    modules = seen["project"]
    assert "sdxl_trt.runtime.pipeline" in modules and "sdxl_trt.serve.http.app" in modules  # it did serve
    assert [m for m in modules if _layer(m) in ("export", "engine")] == []
    # diffusers and the exporter's graph tools stay out too (transformers comes in for CLIPTokenizer only).
    assert seen["heavy"] == []


def _module_level_imports(path: Path, module: str) -> list[str]:
    """What ``path`` imports when it is imported (statements outside functions; ``TYPE_CHECKING`` blocks count,
    since a type checker follows them), as absolute names; ``from pkg import sub`` names the submodule."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[str] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.Import):
                out.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                out.append(name)
                out.extend(f"{name}.{a.name}" for a in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and not isinstance(node, ast.ClassDef):
                    visit([n for n in inner if isinstance(n, ast.stmt)] +
                          [s for h in inner if isinstance(h, ast.ExceptHandler) for s in h.body])
    visit(ast.parse(path.read_text(), str(path)).body)
    return out


def _import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Strongly connected groups of more than one module in the module-level import graph (Tarjan)."""
    graph = {m: sorted({n for n in _module_level_imports(p, m) if n in modules and n != m}) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in graph:
        if v not in index:
            strong(v)
    return cycles


def _project_modules() -> dict[str, Path]:
    modules = {_module_name(p): p for p in _project_files()}
    modules.update({p.stem: p for p in sorted((ROOT / "benchmarks").glob("*.py"))})  # imported by bare name
    return modules


def test_no_import_circle() -> None:
    """No module imports itself through others when loaded (a circle makes import order matter)."""
    assert _import_cycles(_project_modules()) == []


def test_the_circle_check_sees_a_circle(tmp_path: Path) -> None:
    """The check can fail: two modules that import each other at module level (one under TYPE_CHECKING) form a
    circle; a lazy import inside a function does not."""
    (tmp_path / "a.py").write_text("from b import x\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a import y\n")
    (tmp_path / "c.py").write_text("import a\n")
    (tmp_path / "d.py").write_text("def f():\n    import c\n")
    found = _import_cycles({n: tmp_path / f"{n}.py" for n in "abcd"})
    assert found == [["a", "b"]]
