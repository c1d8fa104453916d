#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (ignored by git, carried by the device tool's `carry`),
# for its Python 3.12 (../shared/GPU.md says what that machine has). Run it here, with network, before the call.
#
# What `sdxl-trt build --backend torch` and `sdxl-trt bench --baseline` import there and the machine lacks:
#   diffusers (model classes for export and the baseline) + importlib_metadata (+ zipp and lazy-importer, its
#   dependencies);
#   DeepCache (the --stepcache row's baseline: diffusers under DeepCacheSDHelper);
#   polygraphy and onnx-graphsurgeon (imported by export/ on its ONNX path; a torch-backend build and a bench with
#   both blocked imported neither here, but a GPU test may).
# All pure Python; pinned to the versions CI tests with. onnxruntime-gpu (255 MB) and Ray (79 MB) cannot travel.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
DEST=.whl
WHEELS=(
  diffusers==0.42.1
  importlib_metadata==10.2.0
  zipp==4.1.2
  lazy-importer==0.1.0
  DeepCache==0.1.1
  polygraphy==0.53.6
  onnx_graphsurgeon==0.6.1
)
mkdir -p "$DEST"
git check-ignore -q "$DEST/x.whl" || echo "/$DEST/" >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
total=$(du -sm "$DEST" | cut -f1)
echo "fetch_gpu_wheels: ${total} MiB in $DEST"
if [ "$total" -ge 64 ]; then
  echo "fetch_gpu_wheels: over the device tool's 64 MiB limit; remove old wheels from $DEST" >&2
  exit 1
fi
