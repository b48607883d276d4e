#!/usr/bin/env bash
# The generalisation ablation of docs/evaluation/ablation (issue #3): stage-1 pre-training
# (none / organ masks / unlabelled slices) and anatomical guidance, each trained with the same
# reduced budget on ../shared/data/ct-abdomen with the central 20 % slab held out, plus the
# deterministic UNet baseline with that budget; scored on the held-out slab with the full
# field of view and with the scan cropped to the upper abdomen (another field of view).
# Usage: scripts/run_ablation.sh [RUNS_DIR]     (about 40 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/ablation}
DATA=../shared/data/ct-abdomen
UPPER=$RUNS/ct-upper-fov
P=${PROGIDIFF:-.venv/bin/progidiff}
ORGANS="liver spleen kidney_left kidney_right"
COMMON="--organs $ORGANS --holdout-fraction 0.2 --finetune-base --base-lr-scale 1.0 --stage2-steps 250 --dice-loss sample"
mkdir -p "$RUNS"
[ -d "$UPPER" ] || .venv/bin/python scripts/crop_dataset_fov.py $DATA "$UPPER" --z-min 250
train() { local name=$1; shift; [ -f "$RUNS/$name/config.json" ] || [ -f "$RUNS/$name/baseline_card.json" ] || $P train $DATA -o "$RUNS/$name" $COMMON "$@"; }
train no-stage1        --stage1-steps 0
train stage1-masks     --stage1-steps 100 --stage1-data masks
train stage1-images    --stage1-steps 100 --stage1-data images
train stage1-masks-guidance --stage1-steps 100 --stage1-data masks --anatomical-guidance
train baseline-unet    --stage1-steps 100 --baseline unet
for m in no-stage1 stage1-masks stage1-images stage1-masks-guidance; do
  for d in full:$DATA upper:$UPPER; do
    tag=${d%%:*}; ds=${d#*:}
    [ -f "$RUNS/eval-$m-$tag/report.json" ] || $P evaluate "$RUNS/$m" "$ds" -n 4 --baseline "$RUNS/baseline-unet" \
        --overwrite -o "$RUNS/eval-$m-$tag"
  done
done
.venv/bin/python scripts/ablation_table.py "$RUNS" > docs/evaluation/ablation/README.md
