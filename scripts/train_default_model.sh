#!/usr/bin/env bash
# Trains the shipped default CT model (Resources/Models/progidiff-ct-abdomen) from nothing, with
# the four commands it was made with, and prints the total wall time:
#   1. ct-v3's recipe: stage 1 (organ-mask prior, 400 steps) + stage 2 (2,400 steps) with the
#      batch Dice, which learns the large organs (liver, spleen, kidneys) best of every loss tried;
#   2. 1,000 more stage-2 steps from that model (--init-from) at a third of the learning rate
#      with the batch + per-slice Dice, which adds the aorta, IVC and pancreas;
#   3. 600 more stage-2 steps from that with the body-size augmentation widened both ways
#      (--body-scale 0.6 1.6667: content 0.6x to 1.67x as large), which keeps the spleen and aorta
#      on a body 0.85x as wide and the stomach on one 1.15x as wide (docs/evaluation/ct-v11-600-more-steps
#      is the same without the wider range, docs/evaluation/ct-v10 with 0.6 1.3333);
#   4. 600 more stage-2 steps from that with half the slices in a random contrast phase made from their
#      labels (--contrast-phase 0.5), which finds the aorta and IVC on a contrast-enhanced scan
#      (docs/evaluation/ct-v13-contrast-phase).
# All hold out the same slab (--holdout-fraction 0.2), on which `progidiff evaluate` scores it.
# About 90 min on 2 CPU cores (47.6 + 18.8 + 11.7 + 11.8 min measured); set ACCEL="accelerate launch -m progidiff.cli"
# for several GPUs.
# Usage: scripts/train_default_model.sh [OUT_DIR]
#   (writes OUT_DIR-stage-a, OUT_DIR-stage-b, OUT_DIR-stage-c and OUT_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/progidiff-ct-abdomen}
DATA=../shared/data/ct-abdomen
P=${ACCEL:-${PROGIDIFF:-.venv/bin/progidiff}}
COMMON=(--holdout-fraction 0.2 --finetune-base --base-lr-scale 1.0)
start=$(date +%s)
$P train $DATA -o "$OUT-stage-a" --stage1-steps 400 --stage2-steps 2400 --dice-loss batch "${COMMON[@]}"
$P train $DATA -o "$OUT-stage-b" --init-from "$OUT-stage-a" --stage2-steps 1000 --lr 1e-4 --dice-loss both "${COMMON[@]}"
$P train $DATA -o "$OUT-stage-c" --init-from "$OUT-stage-b" --stage2-steps 600 --lr 1e-4 --dice-loss both \
    --body-scale 0.6 1.6667 "${COMMON[@]}"
$P train $DATA -o "$OUT" --init-from "$OUT-stage-c" --stage2-steps 600 --lr 1e-4 --dice-loss both \
    --body-scale 0.6 1.6667 --contrast-phase 0.5 "${COMMON[@]}"
echo "default model trained into $OUT in $(( ($(date +%s) - start) / 60 )) min"
