#!/usr/bin/env bash
# The GPU half of issue 5 in one go: peak CUDA memory and step time of every branch plan, ViT-B/16
# geometry (random init), MoE and LoRA on both towers, batches 64 and 128, 10 class prompts padded to
# 77 tokens as the paper's reference code does; then MoE at the largest batch with mozo's default
# padding under bf16. Needs a CUDA torch; writes JSON, tables and charts to ${1:-bench-gpu}. About 5-8
# minutes on one H100/H200-class GPU. BACKBONE, DEVICE, BATCHES and PLANS override the defaults (a quick
# check of the script on a CPU: BACKBONE=tiny DEVICE=cpu BATCHES=2 PLANS=fo,dual-zo,dual:suffix-2
# scripts/bench_gpu.sh /tmp/check).
set -euo pipefail
out=${1:-bench-gpu}
backbone=${BACKBONE:-vit-b-16}
device=${DEVICE:-cuda}
batches=${BATCHES:-64 128}
plans=${PLANS:-fo,dual-zo,vision-zo,language-zo,dual:suffix-6,dual:hop-odd}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } > "$out/gpu.csv" 2>&1
for peft in moe lora; do
  for batch in $batches; do
    mozo bench --backbone "$backbone" --peft "$peft" --batch "$batch" --classes 10 --prompt-padding max_length \
      --device "$device" --plans "$plans" --steps 5 --warmup 2 \
      --json "$out/${peft}_b${batch}.json" --plot "$out/${peft}_b${batch}.png" | tee "$out/${peft}_b${batch}.md"
  done
done
last=${batches##* }
mozo bench --backbone "$backbone" --peft moe --batch "$last" --classes 10 --device "$device" --precision bf16 \
  --plans fo,dual-zo,vision-zo,language-zo --steps 5 --warmup 2 --json "$out/moe_b${last}_longest_bf16.json" \
  | tee "$out/moe_b${last}_longest_bf16.md"
