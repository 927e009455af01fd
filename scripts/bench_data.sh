#!/usr/bin/env bash
# The input-pipeline figures of docs/benchmarks.md (section Input pipeline): images/s of reading + the
# training transform per loader worker count for the demo stream, CIFAR-100-shaped arrays and 500x375
# JPEGs (synthetic, made here by scripts/synthetic_data.py), as `mozo run` loads them. Writes JSON and
# tables to ${1:-bench-data}. STEP=1 also times each preset's training step (on a GPU: what it consumes);
# THREADS sets torch's threads in the timing process (default 1); DEVICE the device (default: cuda if any).
set -euo pipefail
out=${1:-bench-data}
threads=${THREADS:-1}
extra=()
[ -n "${STEP:-}" ] && extra+=(--step)
[ -n "${DEVICE:-}" ] && extra+=(--device "$DEVICE")
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
[ -d "$out/cifar/cifar-100-python" ] || python "$here/synthetic_data.py" cifar "$out/cifar" 100
[ -d "$out/jpegs/train" ] || python "$here/synthetic_data.py" jpegs "$out/jpegs" 8 80
nproc > "$out/cores.txt"
mozo bench --data demo --threads "$threads" "${extra[@]}" --json "$out/demo.json" | tee "$out/demo.md"
mozo bench --data cifar100-10-10 --data-root "$out/cifar" --images 384 --threads "$threads" "${extra[@]}" \
  --json "$out/cifar.json" | tee "$out/cifar.md"
mozo bench --data imagenet-r-inc20 protocol=cil data.dataset=imagefolder --data-root "$out/jpegs" --images 256 \
  --threads "$threads" "${extra[@]}" --json "$out/jpegs.json" | tee "$out/jpegs.md"
