#!/usr/bin/env bash
# Issue #4's comparison on the MR slices not used for adaptation: the CT model alone, the CT
# model + the shipped LoRA adapter, the adapter trained without bias-field augmentation, and a
# model trained from scratch on the same K = 10 MR slices (same sample budget as the adapter
# plus a stage 1, base and branch both trained). About 15 min on 2 CPU cores.
# Usage: scripts/run_mr_comparison.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/mr}
MR=../shared/data/mr-abdomen
CT=Resources/Models/progidiff-ct-abdomen
LORA=Resources/Models/progidiff-ct-abdomen-mr-lora
P=${PROGIDIFF:-.venv/bin/progidiff}
mkdir -p "$RUNS"
[ -f "$RUNS/scratch/config.json" ] || $P train $MR -o "$RUNS/scratch" --holdout-like $LORA --modality MR \
    --stage1-steps 100 --stage2-steps 300 --batch-size 8 --finetune-base --base-lr-scale 1.0 --dice-loss batch
[ -f "$RUNS/lora-no-bias-field/adapter_card.json" ] || $P adapt $MR --from $CT --modality MR --shots 10 \
    --no-bias-field -o "$RUNS/lora-no-bias-field"
[ -f "$RUNS/eval-scratch/report.json" ] || $P evaluate "$RUNS/scratch" $MR -n 8 --modality MR --baseline none \
    --overwrite -o "$RUNS/eval-scratch"
[ -f "$RUNS/eval-lora-no-bias-field/report.json" ] || $P evaluate $CT $MR -n 8 --modality MR --baseline none \
    --adapter "$RUNS/lora-no-bias-field" --overwrite -o "$RUNS/eval-lora-no-bias-field"
mkdir -p docs/evaluation/mr-scratch docs/evaluation/mr-adapter-no-bias-field
cp "$RUNS"/eval-scratch/report.* docs/evaluation/mr-scratch/
cp "$RUNS"/eval-lora-no-bias-field/report.* docs/evaluation/mr-adapter-no-bias-field/
.venv/bin/python scripts/compare_reports.py "CT model alone=docs/evaluation/mr-ct-no-adapter" \
    "CT model + MR LoRA adapter (shipped)=docs/evaluation/mr-adapter" \
    "CT model + adapter without bias-field augmentation=docs/evaluation/mr-adapter-no-bias-field" \
    "from scratch on the same 10 MR slices=docs/evaluation/mr-scratch" > docs/evaluation/mr-comparison.md
