"""Copy the ``tensorrt-stubs`` package into a stub directory mypy reads, mending what stops mypy.

Why: ``tensorrt-stubs`` (10.13) installs ``tensorrt/`` and ``tensorrt_bindings/`` without a ``py.typed``
marker, so mypy skips them and every TensorRT call type-checks as ``Any``; and ``tensorrt_bindings/
tensorrt.pyi`` has syntax errors (parameters named ``in``; ``add_scale_nd``'s ``channel_axis`` without a
default after defaulted parameters). A copy in a directory on ``mypy_path`` needs no marker, and the two
mends make it parse. See /work/shared/TENSORRT.md.

Usage (CI runs this before pytest; the destination is git-ignored)::

    .venv/bin/pip install --no-deps tensorrt-stubs==10.13.0.35.1
    .venv/bin/python tests/support/mend_tensorrt_stubs.py build/typings

Exits non-zero, naming the file and line, if the stubs are not installed or still do not parse.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "tensorrt-stubs"
PACKAGES = ("tensorrt", "tensorrt_bindings")

# `def f(self, in: list[...], ...)`: `in` is a keyword. Only parameter lists on `def` lines are touched.
_IN_PARAM = re.compile(r"(?<=[(,]\s)in(?=:)|(?<=\()in(?=:)")
# `..., power: Weights = None, channel_axis: int)`: a parameter without a default after defaulted ones.
_CHANNEL_AXIS = re.compile(r"channel_axis: int\)")


def mend(text: str) -> tuple[str, int]:
    """Return the mended stub text and the number of lines changed."""
    lines = text.splitlines(keepends=True)
    changed = 0
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("def "):
            continue
        new = _IN_PARAM.sub("in_", line)
        if "def add_scale_nd(" in new:
            new = _CHANNEL_AXIS.sub("channel_axis: int = ...)", new)
        if new != line:
            lines[i] = new
            changed += 1
    return "".join(lines), changed


def installed_stub_root() -> Path:
    """The site-packages directory that holds the installed ``tensorrt-stubs`` files."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise SystemExit(
            f"{DISTRIBUTION} is not installed in {sys.prefix}; install it with "
            f"`{sys.executable} -m pip install --no-deps {DISTRIBUTION}==10.13.0.35.1`"
        ) from None
    return Path(str(dist.locate_file("")))


def _write_if_changed(path: Path, text: str) -> bool:
    """Write atomically (temp file + rename) so a concurrent mypy run never reads half a file."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def mend_tree(dest: Path, source: Path | None = None) -> dict[str, int]:
    """Copy and mend every ``.pyi`` of both stub packages into ``dest``; return lines mended per file."""
    source = source or installed_stub_root()
    report: dict[str, int] = {}
    for package in PACKAGES:
        stubs = sorted((source / package).glob("*.pyi"))
        if not stubs:
            raise SystemExit(f"no .pyi files under {source / package}: is {DISTRIBUTION} installed there?")
        for stub in stubs:
            text, changed = mend(stub.read_text(encoding="utf-8"))
            rel = f"{package}/{stub.name}"
            try:
                ast.parse(text, filename=rel)
            except SyntaxError as e:
                raise SystemExit(f"{rel}:{e.lineno}: still not valid Python after mending: {e.msg}") from None
            _write_if_changed(dest / package / stub.name, text)
            report[rel] = changed
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", nargs="?", default="build/typings", type=Path,
                        help="stub directory to write (mypy_path); default build/typings")
    parser.add_argument("--source", type=Path, default=None,
                        help="directory holding tensorrt/ and tensorrt_bindings/ stubs; default: the installed package")
    args = parser.parse_args(argv)
    report = mend_tree(args.dest, args.source)
    mended = ", ".join(f"{name} ({n} lines mended)" for name, n in report.items())
    print(f"TensorRT stubs written to {args.dest}: {mended}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
