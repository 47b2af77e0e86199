#!/usr/bin/env bash
# The checks only a GPU can make, in one go, for a session lent one (docs/benchmarks.md), most
# important first, each under its own time limit so a slow one cannot starve the rest:
#   1. captured sampling equals eager, every generator, fp32 and bf16 (tests/test_sync_free.py -k cuda);
#   2. the paper-size speed table at 16 images per call, NestAR-B and -L against MAR and DiT, eager
#      and captured (section speed_paper), with the GPU memory the recorded graphs took;
#   3. NestAR-B's training step at batch 64 in bf16 with its counted FLOPs and MFU, against DiT and
#      MAR matched on parameters (section train_paper);
#   4. the quickstart on CUDA: train, sample, evaluate (step time and the whole command);
#   5. a one-process NCCL training smoke run (--distributed 1);
#   6. the paper-size tables at 64 (both models) and 256 images per call (NestAR-B), eager and
#      captured (sections speed_paper_b64, speed_paper_b256).
# The default limits add up to 480 s, so the whole script fits one 10-minute call with the
# machine's start. Everything lands in OUTDIR: a copy of docs/benchmarks.md with the sections
# filled, one log per step (with its wall time), the GPU's name, and the smoke runs' summaries and
# metrics. Copy the filled sections back (or the file) and record the device beside every figure.
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
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/$name.log"
  tail -n 4 "$OUT/$name.log"
}

step capture_equals_eager "${EQUAL_LIMIT:-50}" "$PY" -m pytest -q -p no:cacheprovider tests/test_sync_free.py -k cuda
step speed_paper "${SPEED_LIMIT:-130}" "$PY" benchmarks/bench_speed.py --paper-size --images 16 --repeats 2 \
  --capture both --out "$OUT/benchmarks.md"
step train_paper "${TRAIN_LIMIT:-60}" "$PY" benchmarks/bench_train.py --model NestAR-B --batch 64 --steps 5 \
  --warmup 2 --precision bf16 --out "$OUT/benchmarks.md"
SMOKE_DIR=$(mktemp -d)
step quickstart "${SMOKE_LIMIT:-80}" "$PY" -m nestar_lab.cli run studies/configs/quickstart.yaml \
  --run-dir "$SMOKE_DIR/gpu_smoke"
cp "$SMOKE_DIR/gpu_smoke/metrics.json" "$OUT/quickstart_metrics.json" 2>/dev/null
cp "$SMOKE_DIR/gpu_smoke/train_summary.json" "$OUT/quickstart_train_summary.json" 2>/dev/null
step nccl "${NCCL_LIMIT:-40}" "$PY" -m nestar_lab.cli train studies/configs/quickstart.yaml --distributed 1 \
  --set train.steps=100 --set distributed.backend=nccl --run-dir "$SMOKE_DIR/nccl_smoke"
cp "$SMOKE_DIR/nccl_smoke/train_summary.json" "$OUT/nccl_train_summary.json" 2>/dev/null
step speed_paper_b64 "${SPEED64_LIMIT:-70}" "$PY" benchmarks/bench_speed.py --paper-size --images 64 --repeats 1 \
  --capture both --out "$OUT/benchmarks.md" --section speed_paper_b64
step speed_paper_b256 "${SPEED256_LIMIT:-50}" "$PY" benchmarks/bench_speed.py --paper-size --models NestAR-B \
  --images 256 --repeats 1 --capture both --out "$OUT/benchmarks.md" --section speed_paper_b256
exit 0
