"""The type check, a step of its own in `.ci/run`: mypy over the TensorRT modules (the files mypy.ini lists)
against the mended stubs must pass, and on a canary snippet of wrong TensorRT calls must report exactly its two
errors. The canary proves the first pass is not vacuous: stubs that are missing, unparsed or read as ``Any``
would pass the real files too, and must fail here.

Usage (after ``tests/support/mend_tensorrt_stubs.py build/typings``, as `.ci/run` does)::

    .venv/bin/python tests/support/typecheck.py

Both runs share mypy's cache (``.mypy_cache``, git-ignored), so the canary costs about a second after the first
run; the snippet is written to a temporary directory, never into the checkout. Exits 1 naming what went wrong.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CANARY = textwrap.dedent("""\
    import tensorrt as trt

    def build() -> None:
        builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
        builder.no_such_method()
        profile = builder.create_optimization_profile()
        profile.set_shape("sample", (1, 4, 128, 128), trt.Dims([2, 4, 128, 128]), trt.Dims([2, 4, 128, 128]))
        profile.set_shape("sample", trt.Dims([1]), trt.Dims([2]), trt.Dims([2]))
""")
"""Line 5: an attribute the Builder does not have; line 7: a tuple where ``Dims`` is required; line 8 is right."""

EXPECTED = (
    re.compile(r'wrong_tensorrt_use\.py:5: error: "Builder" has no attribute "no_such_method"'),
    re.compile(r'wrong_tensorrt_use\.py:7: error: Argument 2 to "set_shape" of "IOptimizationProfile" has '
               r'incompatible type "[Tt]uple\[int, int, int, int\]"; expected "Dims"'),
    re.compile(r"Found 2 errors in 1 file"),
)


def mypy(*files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", *files], cwd=ROOT,
                          capture_output=True, text=True)


def canary_problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    """What is wrong with mypy's answer on the canary (empty: it reported exactly the expected errors)."""
    problems = [] if result.returncode == 1 else [f"mypy exited {result.returncode}, expected 1"]
    return problems + [f"missing: {p.pattern}" for p in EXPECTED if not p.search(result.stdout)]


def main() -> int:
    real = mypy()  # the files listed in mypy.ini
    print(real.stdout, end="")
    if real.returncode != 0 or "Success: no issues found" not in real.stdout:
        print(f"typecheck: mypy over the TensorRT modules failed (exit {real.returncode})\n{real.stderr}",
              file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="sdxl-trt-canary-") as tmp:
        snippet = Path(tmp) / "wrong_tensorrt_use.py"
        snippet.write_text(CANARY)
        result = mypy(str(snippet))
    problems = canary_problems(result)
    if problems:
        print("typecheck: the canary's wrong TensorRT calls were not reported as expected, so the check above "
              f"proves nothing: {'; '.join(problems)}\n{result.stdout}{result.stderr}", file=sys.stderr)
        return 1
    print("typecheck: the canary's 2 wrong TensorRT calls were reported")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
