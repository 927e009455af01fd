#!/usr/bin/env bash
# The GPU half of issue 5 in one go: peak CUDA memory and step time of every branch plan, ViT-B/16
# geometry (random init), MoE and LoRA on both towers, batches 64 and 128, 10 class prompts padded to
# 77 tokens as the paper's reference code does. Needs a CUDA torch; writes JSON, tables and charts to
# ${1:-bench-gpu}. About 5-8 minutes on one H100/H200-class GPU.
set -euo pipefail
out=${1:-bench-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" || true
for peft in moe lora; do
  for batch in 64 128; do
    mozo bench --backbone vit-b-16 --peft "$peft" --batch "$batch" --classes 10 --prompt-padding max_length \
      --device cuda --plans fo,dual-zo,vision-zo,language-zo,dual:suffix-6,dual:hop-odd --steps 5 --warmup 2 \
      --json "$out/${peft}_b${batch}.json" --plot "$out/${peft}_b${batch}.png" | tee "$out/${peft}_b${batch}.md"
  done
done
# The same with mozo's default padding (prompts cut at the longest) and bf16 autocast, MoE, batch 128.
mozo bench --backbone vit-b-16 --peft moe --batch 128 --classes 10 --device cuda --precision bf16 \
  --plans fo,dual-zo,vision-zo,language-zo --steps 5 --warmup 2 --json "$out/moe_b128_longest_bf16.json" \
  | tee "$out/moe_b128_longest_bf16.md"
