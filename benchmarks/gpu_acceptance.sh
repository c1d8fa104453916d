#!/usr/bin/env bash
# GPU acceptance in one command, for a bare GPU machine given this tree and a folder of wheels (.whl/).
#
#   bash benchmarks/gpu_acceptance.sh [--refiner] [--compile] [--sizes 1024x1024,...] [--steps N] [--runs N]
#                                     [--budget-s S] [--skip-tests] [--controlnet] [--stepcache] [--dry-run]
# (--refiner or --compile: add --skip-tests or a larger --budget-s; both need more than 8 minutes together)
#
# Phases, each under its own `timeout` so one slow phase cannot eat the rest (the script keeps going and
# reports what it has):
#   1. install   wheels from .whl/ into /tmp/site (no network), then the project (`pip install -e .`, or a
#                package shim on PYTHONPATH when that cannot run)
#   2. tests     pytest -m gpu tests/
#   3. build     full-size sdxl-base-1.0 (seeded random weights) with the torch backend, fp16, on the GPU
#   4. bench     sdxl-trt bench: 1024x1024, 30 steps, batch 1, 3 runs, diffusers baseline + fp32 reference
#   5. compiled  (--compile) the same engines loaded with Inductor, no baseline
#   5b. controlnet (--controlnet) benchmarks/bench_controlnet.py: none, one and two full-size ControlNets
#                (sdxl-controlnet, random weights) per step, against the build of phase 3 without them
#   5c. stepcache (--stepcache) phase 3 builds with --deepcache 0; sdxl-trt bench --cache-interval 3
#                --cache-branch 0 on those engines against diffusers + DeepCacheSDHelper at the same N and K
#                (the headline row is the uncached figure on the same engines)
#   6. summary   one screen, printed last
# Everything lands in $OUT (default benchmarks/results/acceptance-<UTC time>): acceptance.log, summary.md,
# gpu-tests.xml and reports.tar.gz (every report: headline.{json,md,png}, compiled.{json,md},
# controlnet.{json,md,png}, stepcache.{json,md}) -- 4 files whatever the flags; the device tool returns at
# most 8 (the script fails if $OUT holds more). Unpack the bundle into benchmarks/results/ to commit them.
#
# --dry-run (or SDXL_TRT_ACCEPTANCE_DRY_RUN=1): the same phases on the CPU with the tiny model and the
# environment already installed (no wheel install): ONNX Runtime fp32 engines (DRY_BACKEND=torch for the torch
# backend), 4 steps, 2 runs. CI runs it (.ci/run) so the script never rots.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DRY=${SDXL_TRT_ACCEPTANCE_DRY_RUN:-0}
REFINER=0; COMPILE=0; SKIP_TESTS=0; CONTROLNET=0; STEPCACHE=0
SIZES=""; STEPS=""; RUNS=""
BUDGET=${ACCEPTANCE_BUDGET_S:-}   # seconds for the whole script, install to summary (default below)
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --refiner) REFINER=1 ;;
    --compile) COMPILE=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --controlnet) CONTROLNET=1 ;;
    --stepcache) STEPCACHE=1 ;;
    --sizes) SIZES=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --runs) RUNS=$2; shift ;;
    --budget-s) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "gpu_acceptance.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

START=$(date +%s)
STAMP=$(date -u +%Y%m%d-%H%M%S)
WORK=${ACCEPTANCE_WORK:-$(mktemp -d /tmp/sdxl-trt-acceptance.XXXXXX)}
if [ "$DRY" = 1 ]; then OUT=${OUT:-$WORK/out}; else OUT=${OUT:-$ROOT/benchmarks/results/acceptance-$STAMP}; fi
mkdir -p "$OUT" "$WORK/reports"
exec > >(tee -a "$OUT/acceptance.log") 2>&1
PHASES=$WORK/phases.tsv
: > "$PHASES"

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}; [ -x "$PY" ] || PY=python3
  MODEL=tiny; REF_MODEL=tiny-refiner; DEVICE=cpu; PRECISION=fp32; BACKEND=${DRY_BACKEND:-onnxruntime}
  SIZES=${SIZES:-256x256}; STEPS=${STEPS:-4}; RUNS=${RUNS:-2}
  # About a minute of CPU time in all; the limits only guard against a hang on a busy shared machine.
  B_INSTALL=0; B_TESTS=240; B_BUILD=300; B_COMPILED=120; B_CONTROLNET=300; B_STEPCACHE=200; BUDGET=${BUDGET:-900}
  CN_MODEL=tiny-controlnet
else
  PY=${PYTHON:-python3}
  MODEL=sdxl-base-1.0; REF_MODEL=sdxl-refiner-1.0; DEVICE=cuda; PRECISION=fp16; BACKEND=torch
  SIZES=${SIZES:-1024x1024}; STEPS=${STEPS:-30}; RUNS=${RUNS:-3}
  B_INSTALL=90; B_TESTS=120; B_BUILD=200; B_COMPILED=150; B_CONTROLNET=240; B_STEPCACHE=150
  BUDGET=${BUDGET:-470}  # 8 minutes minus a margin; --stepcache: pass --skip-tests (or a larger --budget-s)
  CN_MODEL=sdxl-controlnet  # with --controlnet: pass --skip-tests (or a larger --budget-s) to leave it time
  # Inductor compiles each (bucket, batch) shape at build (base UNet 135-160 s on an H100), the refiner adds a
  # second 2.3 B-parameter export: with either, pass --skip-tests or a larger --budget-s (at most ~580 in a
  # 600 s call) so the benchmark still gets its time.
  [ "$COMPILE" = 1 ] && B_BUILD=$(( B_BUILD + 200 ))
  [ "$REFINER" = 1 ] && B_BUILD=$(( B_BUILD + 90 ))
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

log() { echo "[acceptance $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

# phase NAME BUDGET_S RESERVE_S CMD...: run CMD under `timeout`, capped so that RESERVE_S stays for later phases.
phase() {
  local name=$1 budget=$2 reserve=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) - reserve ))
  local t=$(( budget < left ? budget : left ))
  if [ "$t" -lt 10 ]; then
    log "$name: skipped, no time left (${left}s)"
    printf '%s\tskipped\t0\t0\n' "$name" >> "$PHASES"
    return 124
  fi
  log "$name: start (timeout ${t}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout -s INT -k 20 "$t" "$@"
  rc=$?
  log "$name: exit $rc after $(( $(date +%s) - t0 ))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$t" >> "$PHASES"
  return $rc
}

do_install() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || return 1
  else
    log "install: no .whl/ folder (run benchmarks/fetch_gpu_wheels.sh before the device call)"
  fi
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>"$WORK/pip-e.err"; then
    log "install: 'pip install -e .' failed ($(tail -n 1 "$WORK/pip-e.err")); using a package shim on PYTHONPATH"
    # The sdxl_trt.* mapping of pyproject.toml's package-dir, as links: sdxl_trt/ plus runtime/, export/, ...
    local shim=/tmp/sdxl-trt-shim/sdxl_trt
    rm -rf /tmp/sdxl-trt-shim && mkdir -p "$shim"
    for f in "$ROOT"/sdxl_trt/*; do ln -s "$f" "$shim/$(basename "$f")"; done
    for d in export engine runtime serve; do ln -sfn "$ROOT/$d" "$shim/$d"; done
    echo "/tmp/sdxl-trt-shim" > "$WORK/shim"
    export PYTHONPATH=/tmp/sdxl-trt-shim${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" - <<'EOF'
import importlib
for name in ("sdxl_trt.bench.runner", "sdxl_trt.runtime.pipeline", "sdxl_trt.engine.build", "diffusers"):
    importlib.import_module(name)
import torch
print("install: imports ok; torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
}

log "sdxl-trt GPU acceptance ($([ "$DRY" = 1 ] && echo "dry run: tiny on the CPU" || echo "$MODEL on $DEVICE")); out $OUT; budget ${BUDGET}s"
git log --oneline -1 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>/dev/null || true

# 1. install
if [ "$DRY" = 0 ]; then
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export -f do_install log
  export PY ROOT WORK START
  phase install "$B_INSTALL" 0 bash -c do_install || log "install: failed; continuing with what imports"
  [ -f "$WORK/shim" ] && export PYTHONPATH=$(cat "$WORK/shim"):$PYTHONPATH
else
  printf 'install\tskipped (dry run)\t0\t0\n' >> "$PHASES"
fi

# 2. GPU tests (collection errors, e.g. a serving module whose extra is absent, do not stop the others)
if [ "$SKIP_TESTS" = 0 ]; then
  phase tests "$B_TESTS" 240 "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider -rfEs \
    --continue-on-collection-errors --junitxml="$OUT/gpu-tests.xml"
else
  printf 'tests\tskipped (--skip-tests)\t0\t0\n' >> "$PHASES"
fi

# 3. build
ENGINES=$WORK/engines
BUILD=("$PY" -m sdxl_trt.cli build --model "$MODEL" --out "$ENGINES" --backend "$BACKEND" --precision "$PRECISION"
       --buckets "$SIZES" --max-batch 1 --device "$DEVICE")
[ "$REFINER" = 1 ] && BUILD+=(--refiner "$REF_MODEL")
[ "$COMPILE" = 1 ] && BUILD+=(--compile)
[ "$STEPCACHE" = 1 ] && BUILD+=(--deepcache 0)
phase build "$B_BUILD" 60 "${BUILD[@]}"

# 4. the headline benchmark (it writes its report after each pipeline, so a timeout keeps the first figures)
BENCH=("$PY" -m sdxl_trt.cli bench --engines "$ENGINES" --out "$WORK/reports" --name headline --baseline "$MODEL"
       --sizes "$SIZES" --steps "$STEPS" --runs "$RUNS" --batches 1 --device "$DEVICE")
[ "$REFINER" = 1 ] && BENCH+=(--refiner-mode ensemble)
[ "$DRY" = 1 ] && BENCH+=(--threads 1)  # 2 shared cores: torch's spinning threads would time the neighbours
if [ -f "$ENGINES/manifest.json" ]; then
  phase bench 100000 $(( 10 + (COMPILE ? 80 : 0) + (STEPCACHE ? B_STEPCACHE : 0) )) "${BENCH[@]}"
else
  log "bench: skipped, no engines were built"; printf 'bench\tskipped (no engines)\t0\t0\n' >> "$PHASES"
fi

# 5. compiled (Inductor artifacts stored by the build), sdxl-trt alone
if [ "$COMPILE" = 1 ] && [ -f "$ENGINES/manifest.json" ]; then
  phase compiled "$B_COMPILED" 10 "$PY" -m sdxl_trt.cli bench --engines "$ENGINES" --out "$WORK/reports" \
    --name compiled --compile --sizes "$SIZES" --steps "$STEPS" --runs "$RUNS" --batches 1 --device "$DEVICE" \
    --no-reference --no-plot
fi

# 5b. ControlNet cost per step (its own engine directory with two ControlNets; phase 3's build is the plain row)
if [ "$CONTROLNET" = 1 ] && [ -f "$ENGINES/manifest.json" ]; then
  phase controlnet "$B_CONTROLNET" 10 "$PY" benchmarks/bench_controlnet.py --model "$MODEL" --controlnet "$CN_MODEL" \
    --backend "$BACKEND" --precision "$PRECISION" --device "$DEVICE" --size "${SIZES%%,*}" --steps "$STEPS" \
    --runs "$RUNS" --plain-engines "$ENGINES" --out "$WORK/reports" --name controlnet \
    $([ "$DRY" = 1 ] && echo "--baseline diffusers" || echo "--baseline none")
fi

# 5c. step caching (DeepCache) at N = 3, K = 0 on phase 3's engines, against diffusers + DeepCacheSDHelper
if [ "$STEPCACHE" = 1 ] && [ -f "$ENGINES/manifest.json" ]; then
  phase stepcache "$B_STEPCACHE" 10 "${BENCH[@]/headline/stepcache}" --cache-interval 3 --cache-branch 0 \
    --no-reference --no-step-split --no-plot
fi

# 6. summary: bundle the reports (one file, whatever the flags), print one screen
REPORTS=$(cd "$WORK/reports" && ls -1 2>/dev/null | sort)
if [ -n "$REPORTS" ]; then
  # shellcheck disable=SC2086  # report names are the phases' own (letters, digits, dots)
  tar -czf "$OUT/reports.tar.gz" -C "$WORK/reports" $REPORTS && log "reports in $OUT/reports.tar.gz: $(echo $REPORTS)"
fi
"$PY" - "$PHASES" "$WORK/reports" "$(( $(date +%s) - START ))" <<'EOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path

phases, reports, total = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
print(f"# sdxl-trt GPU acceptance: {total} s in all\n")
print("| phase | exit | seconds | timeout |\n|---|---|---|---|")
for line in phases.read_text().splitlines():
    name, rc, secs, limit = line.split("\t")
    print(f"| {name} | {rc} | {secs} | {limit} |")
if any(reports.iterdir()):
    print(f"\nreports (reports.tar.gz): {', '.join(sorted(p.name for p in reports.iterdir()))}")


def show(name: str, r: dict) -> None:
    env, e = r["environment"], r["engines"]
    print(f"\n## {name}: {e['model']} {e['backend']} {e['precision']} on {env.get('gpu') or 'CPU'}, "
          f"{r['settings']['steps']} steps, {r['settings']['runs']} runs\n")
    try:
        from sdxl_trt.bench.report import summary_table
        print(summary_table(r))
    except Exception as exc:  # the summary must print even if the package does not import
        print(f"(no table: {exc})")
    p = r["pipelines"]
    for side in ("sdxl_trt", "diffusers"):
        if p.get(side):
            m = p[side]["memory"]
            print(f"\n{side}: load {p[side]['load_s']:.1f} s" + (f", warm-up {p[side]['warmup_s']:.1f} s, "
                  f"graphs {p[side]['cuda_graphs_at_end']}" if side == "sdxl_trt" else "")
                  + (f", peak reserved {m['peak_reserved_gib']:.2f} GiB, device used {m['device_used_gib']:.2f} GiB"
                     if m.get("peak_reserved_gib") is not None else ""))
    print(f"reference: {r['reference']['description']}")
    for n in r.get("notes", []):
        print(f"note: {n}")


for name in ("headline", "compiled", "stepcache"):
    path = reports / f"{name}.json"
    if path.exists():
        try:
            show(name, json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:  # a phase cut short may leave a partial report
            print(f"\n## {name}: unreadable report ({type(exc).__name__}: {exc})")
EOF
# Exit 1 when a phase failed or timed out (the reports of the others are in $OUT all the same), or when $OUT
# holds more files than the device tool returns.
FAILED=$(awk -F'\t' '$2 != "0" && $2 !~ /^skipped/ {print $1}' "$PHASES" | tr '\n' ' ')
N_OUT=$(find "$OUT" -type f | wc -l)
if [ "$N_OUT" -gt 8 ]; then
  log "$OUT holds $N_OUT files; the device tool returns 8 at most: bundle the extra ones"; FAILED="$FAILED out-files"
fi
[ -n "$FAILED" ] && log "phases that failed or timed out: $FAILED"
log "done; everything is in $OUT"
exec >&- 2>&-
sleep 1  # let tee finish the log
[ -z "$FAILED" ]
