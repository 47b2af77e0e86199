#!/usr/bin/env bash
# The checks only a GPU can make, in one go, for a session lent one (docs/benchmarks.md):
#   1. the paper-size speed tables (NestAR-B/-L against MAR and DiT, same parameter counts) at
#      16 and 64 images per call, and NestAR-B at 256 (batch-size matters on a GPU);
#   2. sync-free sampling, the GPU rows (quickstart and NestAR-B);
#   3. a GPU smoke run of the quickstart (train, sample, evaluate on CUDA, bf16 autocast).
# Each step has its own time limit, so a slow one cannot starve the others; on an H200 the steps
# took 172, 158, 83, 48 and 84 s (2026-12-04), so the whole script fits one 10-minute call.
# Everything lands in OUTDIR: a copy of docs/benchmarks.md with its speed_paper, speed_paper_b64,
# speed_paper_b256 and sync_free_gpu sections filled, one log per step, the GPU's name and the
# smoke run's metrics. Copy the filled sections back by hand (or copy the file).
#
#   bash benchmarks/gpu_checks.sh OUTDIR            # PY=python3 by default
set -u
PY=${PY:-python3}
OUT=${1:?usage: gpu_checks.sh OUTDIR}
mkdir -p "$OUT"
cp docs/benchmarks.md "$OUT/benchmarks.md"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PY" -c \
  "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to OUT/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s"
  tail -n 4 "$OUT/$name.log"
}

step speed_paper "${SPEED_LIMIT:-200}" "$PY" benchmarks/bench_speed.py --paper-size --images 16 --repeats 3 \
  --out "$OUT/benchmarks.md"
step speed_paper_b64 "${SPEED64_LIMIT:-180}" "$PY" benchmarks/bench_speed.py --paper-size --images 64 --repeats 1 \
  --out "$OUT/benchmarks.md" --section speed_paper_b64
step speed_paper_b256 "${SPEED256_LIMIT:-100}" "$PY" benchmarks/bench_speed.py --paper-size --models NestAR-B \
  --images 256 --repeats 1 --out "$OUT/benchmarks.md" --section speed_paper_b256
step sync "${SYNC_LIMIT:-60}" "$PY" benchmarks/bench_sync.py --models quickstart,NestAR-B --images 16 --steps 4,16 \
  --out "$OUT/benchmarks.md" --section sync_free_gpu
SMOKE_DIR=$(mktemp -d)
step quickstart "${SMOKE_LIMIT:-110}" "$PY" -m nestar_lab.cli run studies/configs/quickstart.yaml \
  --run-dir "$SMOKE_DIR/gpu_smoke"
find "$SMOKE_DIR" -name metrics.json -exec cp {} "$OUT/quickstart_metrics.json" \; 2>/dev/null
find "$SMOKE_DIR" -name train_summary.json -exec cp {} "$OUT/quickstart_train_summary.json" \; 2>/dev/null
exit 0
