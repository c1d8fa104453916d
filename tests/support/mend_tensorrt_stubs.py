"""Copy the ``tensorrt-stubs`` package into a stub directory mypy reads, mending what stops mypy.

Why: ``tensorrt-stubs`` (10.13) installs ``tensorrt/`` and ``tensorrt_bindings/`` without a ``py.typed``
marker, so mypy skips them and every TensorRT call type-checks as ``Any``; and ``tensorrt_bindings/
tensorrt.pyi`` has syntax errors (parameters named ``in``; ``add_scale_nd``'s ``channel_axis`` without a
default after defaulted parameters). A copy in a directory on ``mypy_path`` needs no marker, and the two
mends make it parse. See /work/shared/TENSORRT.md.

Usage (CI runs this before pytest; the destinations are git-ignored)::

    .venv/bin/pip install --no-deps tensorrt-stubs==10.13.0.35.1
    .venv/bin/python tests/support/mend_tensorrt_stubs.py build/typings --trt11 build/typings-trt11

``--trt11 DIR`` also writes the stubs *as TensorRT 11 has them*: the same mended files with every member 11
removed (weak typing: precision builder flags, INT8 calibrators and calibration profiles, quantization flags,
per-layer precision and output types, dynamic ranges, ``device_memory_size``,
``create_execution_context_without_device_memory``, ``platform_has_fast_*``) renamed away, so a second mypy run
(``MYPYPATH=build/typings-trt11``) reports any use of them. The stubs package is still 10.13: this is how the
code is checked against 11 without 11's stubs.

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


REMOVED_PREFIX = "_removed_in_trt11_"
REMOVED_IN_11: dict[str, tuple[str, ...]] = {
    "BuilderFlag": ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                    "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"),
    "IBuilderConfig": ("int8_calibrator", "get_calibration_profile", "set_calibration_profile", "quantization_flags",
                       "set_quantization_flag", "clear_quantization_flag", "get_quantization_flag"),
    "ICudaEngine": ("device_memory_size", "create_execution_context_without_device_memory"),
    "ILayer": ("precision", "set_output_type", "get_output_type", "reset_precision", "precision_is_set",
               "output_type_is_set", "reset_output_type"),
    "ITensor": ("dynamic_range", "set_dynamic_range", "reset_dynamic_range"),
    "Builder": ("platform_has_fast_fp16", "platform_has_fast_int8"),
    "Refitter": ("set_dynamic_range", "get_dynamic_range", "get_tensors_with_dynamic_range"),
}
"""Members TensorRT 11 removed (its 10.x-to-11.x migration guide; /work/shared/TENSORRT.md), by stub class."""
REMOVED_CLASSES_IN_11 = ("IInt8Calibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2",
                         "IInt8LegacyCalibrator", "IInt8MinMaxCalibrator", "CalibrationAlgoType", "QuantizationFlag")

_CLASS = re.compile(r"^class (\w+)")
_MEMBER = re.compile(r"^    (?:def |@)?(\w+)\b")


def strip_removed(text: str) -> tuple[str, int]:
    """``text`` (a mended stub) with every member and class TensorRT 11 removed renamed to
    ``_removed_in_trt11_<name>`` (so using it is an attribute error), and the re-exports of removed classes
    dropped from ``tensorrt/__init__.pyi`` (an import of a missing name would make it ``Any``). Returns the text
    and how many lines changed."""
    out, changed, current = [], 0, ""
    for line in text.splitlines(keepends=True):
        new = line
        cls = _CLASS.match(line)
        if cls:
            current = cls.group(1)
            if current in REMOVED_CLASSES_IN_11:
                new = line.replace(f"class {current}", f"class {REMOVED_PREFIX}{current}", 1)
        else:
            member = _MEMBER.match(line)
            if member and member.group(1) in REMOVED_IN_11.get(current, ()):
                name = member.group(1)
                new = re.sub(rf"\b{name}\b", REMOVED_PREFIX + name, line, count=1)
            imported = re.match(r"^from tensorrt_bindings\.tensorrt import (\w+)\s*$", line)
            if imported and imported.group(1) in REMOVED_CLASSES_IN_11:
                new = ""
        if new != line:
            changed += 1
        out.append(new)
    return "".join(out), changed


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


def mend_tree(dest: Path, source: Path | None = None, *, trt11: bool = False) -> dict[str, int]:
    """Copy and mend every ``.pyi`` of both stub packages into ``dest``; return lines mended per file.
    ``trt11``: also rename away what TensorRT 11 removed (:func:`strip_removed`)."""
    source = source or installed_stub_root()
    report: dict[str, int] = {}
    for package in PACKAGES:
        stubs = sorted((source / package).glob("*.pyi"))
        if not stubs:
            raise SystemExit(f"no .pyi files under {source / package}: is {DISTRIBUTION} installed there?")
        for stub in stubs:
            text, changed = mend(stub.read_text(encoding="utf-8"))
            if trt11:
                text, removed = strip_removed(text)
                changed += removed
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
    parser.add_argument("--trt11", type=Path, default=None, metavar="DIR",
                        help="also write the stubs less every member TensorRT 11 removed to DIR (e.g. build/typings-trt11)")
    args = parser.parse_args(argv)
    report = mend_tree(args.dest, args.source)
    mended = ", ".join(f"{name} ({n} lines mended)" for name, n in report.items())
    print(f"TensorRT stubs written to {args.dest}: {mended}")
    if args.trt11 is not None:
        report = mend_tree(args.trt11, args.source, trt11=True)
        mended = ", ".join(f"{name} ({n} lines changed)" for name, n in report.items())
        print(f"TensorRT 11 stubs (removed members renamed away) written to {args.trt11}: {mended}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
