#!/usr/bin/env bash
# Ships a trained CT model as the default (Resources/Models/progidiff-ct-abdomen) and brings everything
# that depends on it along, in the order the dependencies require:
#   1. the candidate's files replace the shipped model's (its card keeps its own training record);
#   2. the baseline UNet is retrained with the same data, augmentation options and step budget
#      (--holdout-like the new model, so both hold out the same slab) and replaces the shipped one;
#   3. the MR LoRA adapter is re-adapted on the new base with the shipped adapter's command (an adapter
#      pins its base's sha256 and is refused on any other);
#   4. every evaluation the cards and the README show is re-run: the held-out slab (--simulate-edits),
#      the fatty liver, the painted other person and the PET/CT of another person (--into-card), the MR adapter (--into-card), the
#      rest of the generalisation test, and the bodies 1.3x and 1.45x as wide.
# Steps 1-3 are skipped when their output is there, so a killed run goes on where it stopped;
# step 4 evaluates everything again.
# About 50 min on 2 CPU cores (baseline 17 min, adapter 3 min, evaluations about 30 min).
# Usage: scripts/ship_default_model.sh CANDIDATE_DIR "BASELINE_OPTIONS" [RUNS_DIR]
#   BASELINE_OPTIONS: the candidate's augmentation options, e.g. "--body-scale 0.6 1.6667 --contrast-phase 0.5"
# Afterwards: scripts/run_mr_comparison.sh with its adapter runs removed, the README's numbers, and a commit.
set -euo pipefail
cd "$(dirname "$0")/.."
CAND=${1:?candidate model folder}
BASE_OPTS=${2:?the candidate\'s augmentation options, for the baseline}
RUNS=${3:-runs/ship}
DATA=../shared/data/ct-abdomen
MR=../shared/data/mr-abdomen
CT=Resources/Models/progidiff-ct-abdomen
BASELINE=Resources/Models/progidiff-ct-abdomen-baseline-unet
LORA=Resources/Models/progidiff-ct-abdomen-mr-lora
P=${PROGIDIFF:-.venv/bin/progidiff}
G=runs/generalisation
mkdir -p "$RUNS"
step() { echo "== $* ($(date +%H:%M))"; }

if ! cmp -s "$CAND/diffusion_pytorch_model.safetensors" "$CT/diffusion_pytorch_model.safetensors"; then
  step "1. $CAND -> $CT"
  rm -rf "$CT" && mkdir -p "$CT"
  cp "$CAND"/{README.md,config.json,diffusion_pytorch_model.safetensors,model_card.json,train_log.csv} "$CT/"
  rm -rf "$RUNS"/baseline "$RUNS"/mr-lora
fi
if [ ! -f "$RUNS/baseline/baseline_card.json" ]; then
  step "2. baseline UNet"
  # shellcheck disable=SC2086  # BASE_OPTS is a list of options
  $P train $DATA -o "$RUNS/baseline" --baseline unet --holdout-like $CT --stage1-steps 400 --stage2-steps 4600 $BASE_OPTS
  rm -rf "$BASELINE" && cp -r "$RUNS/baseline" "$BASELINE"
fi
if [ ! -f "$RUNS/mr-lora/adapter_card.json" ]; then
  step "3. MR adapter"
  $P adapt $MR --from $CT --modality MR --shots 10 -o "$RUNS/mr-lora"
  rm -rf "$LORA" && cp -r "$RUNS/mr-lora" "$LORA"
fi
step "4. evaluations"
$P evaluate $CT $DATA -n 8 --simulate-edits --into-card -o docs/evaluation/ct-abdomen --overwrite
$P evaluate $CT $MR -n 8 --modality MR --baseline none --adapter $LORA --into-card -o docs/evaluation/mr-adapter --overwrite
$P evaluate $CT $MR -n 8 --modality MR --baseline none --adapter none --region-from $LORA \
    -o docs/evaluation/mr-ct-no-adapter --overwrite
# Makes the presentations it lacks, then evaluates all thirteen (the card records the three it shows) and rebuilds the tables.
INTO_CARD="ct-fatty-liver ct-painted-mr-person ct-other-person-petct" scripts/run_generalisation_test.sh $G
for f in 1.3 1.45; do
  [ -d "$G/ct-body-x$f" ] || .venv/bin/python scripts/scale_dataset_body.py $DATA "$G/ct-body-x$f" --factor $f
  $P evaluate $CT "$G/ct-body-x$f" -n 8 --overwrite -o "docs/evaluation/ct-body-x$f"
done
step "done"
