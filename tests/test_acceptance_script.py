"""benchmarks/gpu_acceptance.sh leaves at most the 8 files the GPU machine sends back, whatever the flags.

The script runs for real (its phases, timeouts, bundling and summary) with a stand-in for the heavy commands:
``PYTHON`` points at a fake interpreter that writes what each command would leave (a manifest for the build,
``NAME.json/.md/.png`` for a benchmark, the JUnit file for pytest) and hands everything else (the summary) to
the real one. CI also runs the real dry run (``--dry-run --controlnet --skip-tests --steps 2 --runs 1``, .ci/run), which checks the count itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.sh"
MAX_FILES = 8  # what the device tool returns from $OUT

FAKE_PYTHON = textwrap.dedent("""\
    #!{python}
    import os, sys
    from pathlib import Path

    args = sys.argv[1:]
    if not args or args[0] == "-" or args[0] == "-c":  # the summary (a script on stdin): the real interpreter
        os.execv({python!r}, [{python!r}, *args])

    def value(flag):
        return args[args.index(flag) + 1] if flag in args else None

    if args[:2] == ["-m", "pytest"]:
        xml = next(a.split("=", 1)[1] for a in args if a.startswith("--junitxml="))
        Path(xml).write_text("<testsuite tests='0'/>")
    elif "build" in args:
        Path(value("--out")).mkdir(parents=True, exist_ok=True)
        (Path(value("--out")) / "manifest.json").write_text("{{}}")
    elif value("--name"):  # sdxl-trt bench or bench_controlnet.py: a report (plot unless --no-plot)
        out, name = Path(value("--out")), value("--name")
        out.mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".md") + (() if "--no-plot" in args else (".png",)):
            (out / (name + suffix)).write_text("{{}}" if suffix == ".json" else name)
    """)


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fake-python") / "python"
    path.write_text(FAKE_PYTHON.format(python=sys.executable))
    path.chmod(0o755)
    return path


FLAGS = [[], ["--controlnet"], ["--compile"], ["--controlnet", "--compile"], ["--controlnet", "--compile", "--refiner"]]
"""The flags that change which reports exist (--refiner changes none: its rows go into headline)."""


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "+".join(x.strip("-") for x in f) or "plain")
def test_at_most_eight_files_come_back_whatever_the_flags(flags: list[str], fake_python: Path,
                                                          tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": str(fake_python), "OUT": str(out), "ACCEPTANCE_WORK": str(work)}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", *flags], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert proc.returncode == 0, (proc.stdout[-3000:], files)
    assert len(files) <= MAX_FILES, files
    assert {"acceptance.log", "summary.md", "gpu-tests.xml", "reports.tar.gz"} <= set(files), files
    with tarfile.open(out / "reports.tar.gz") as bundle:
        bundled = sorted(bundle.getnames())
    assert bundled == sorted(p.name for p in (work / "reports").iterdir())  # every report, none left behind
    expected = {"headline.json", "headline.md", "headline.png"}
    if "--compile" in flags:
        expected |= {"compiled.json", "compiled.md"}
    if "--controlnet" in flags:
        expected |= {"controlnet.json", "controlnet.md", "controlnet.png"}
    assert set(bundled) == expected
    assert "reports (reports.tar.gz)" in (out / "summary.md").read_text()


def test_the_script_fails_when_out_holds_more_than_eight_files(fake_python: Path, tmp_path: Path) -> None:
    """Its own check: whatever else lands in $OUT (say, a phase writing there directly) is caught."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    for i in range(6):
        (out / f"stray-{i}.txt").write_text("x")
    env = {**os.environ, "PYTHON": str(fake_python), "OUT": str(out), "ACCEPTANCE_WORK": str(work)}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 1
    assert "the device tool returns 8 at most" in (out / "acceptance.log").read_text()
