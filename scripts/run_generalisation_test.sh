#!/usr/bin/env bash
# How the shipped CT model (and its baseline) hold up when the held-out slab comes from another
# field of view or another scanner's resolution and noise: the same held-out slab of the one CT
# person, (1) as shipped, (2) with the scan cropped to the upper abdomen (z >= 250 mm), (3) as
# 5 mm thick slices at 1.5 mm in-plane with 20 HU more noise, (4, 5) as a body 0.85x and 1.15x
# as wide (in-plane spacing scaled, voxels untouched), (6) with its anatomy warped in-plane by a
# smooth random B-spline (organs shifted and bent by about 5 mm on average, up to about 10 mm),
# (7) as thin slices, 0.8 x 0.8 x 1.5 mm with 20 HU of noise per voxel (a routine thin-slice protocol),
# (8) contrast-enhanced, portal-venous phase, organ by organ from its labels (the scan is unenhanced);
# (9) with a fatty liver, 40 HU darker than its own (steatosis, in about a quarter of adults);
# (10) a heavier body: 40 mm more subcutaneous fat, cut off by the scan's field of view where it reaches it;
# (11) the same on a 500 mm field of view, the fat whole (a body 443 mm wide, seen through a 432 mm window); and
# (12) another person's anatomy: the MR person's labels painted as CT with the CT person's Hounsfield
# units (whole scan; docs/evaluation/ct-painted has its control and what it cannot show); and
# (13) a real CT of another person: a contrast-enhanced PET/CT slab of the upper abdomen, 0.98 x 0.98 x 2 mm,
# arms at the sides, from TotalSegmentator's test files on PyPI (scripts/make_petct_dataset.py fetches it with
# pip; docs/evaluation/ct-other-person-petct), and (14) the same with its liver 40 HU darker (a fatty liver);
# (15) with positive oral contrast in the stomach, duodenum and small bowel (250 HU), (16) the same, also
# contrast-enhanced (portal-venous), the commonest abdominal protocol, and (17) the PET/CT with oral contrast
# (docs/evaluation/oral-contrast); (18) contrast-enhanced with five round liver lesions 50 HU darker in the
# held-out slab (metastases; docs/evaluation/liver-lesions).
# Writes docs/evaluation/ct-generalisation.md and the reports beside it. 15.1 min on 2 CPU cores (2026-11-25, the nine before the fatty liver, which takes 2.1 min more;
# earlier runs took up to 35 min for eight, sharing the CPU).
# Usage: scripts/run_generalisation_test.sh [RUNS_DIR [PRESENTATION...]]
#   PRESENTATION (e.g. ct-thin-noisy): evaluate only these again; the tables are rebuilt from every report
#   ("-": evaluate none, only rebuild the tables).
#   INTO_CARD="ct-fatty-liver ..." (environment): also record these presentations' results in the model card
#   (evaluate --into-card), as scripts/ship_default_model.sh does for the ones the card shows.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/generalisation}
shift || true
ALL="ct-upper-fov ct-thick-noisy ct-body-slim ct-body-wide ct-anatomy-warped ct-thin-noisy ct-portal-venous ct-fatty-liver ct-body-fat ct-body-fat-fov500 ct-painted-mr-person ct-other-person-petct ct-other-person-petct-fatty-liver ct-oral-contrast ct-portal-venous-oral ct-other-person-petct-oral ct-portal-venous-liver-lesions"
ONLY=${*:-$ALL}
DATA=../shared/data/ct-abdomen
CT=Resources/Models/progidiff-ct-abdomen
P=${PROGIDIFF:-.venv/bin/progidiff}
PY=.venv/bin/python
mkdir -p "$RUNS"
[ -d "$RUNS/ct-upper-fov" ] || $PY scripts/crop_dataset_fov.py $DATA "$RUNS/ct-upper-fov" --z-min 250
[ -d "$RUNS/ct-thick-noisy" ] || $PY scripts/resample_dataset.py $DATA "$RUNS/ct-thick-noisy" --spacing 1.5 1.5 5 --noise-hu 20
[ -d "$RUNS/ct-body-slim" ] || $PY scripts/scale_dataset_body.py $DATA "$RUNS/ct-body-slim" --factor 0.85
[ -d "$RUNS/ct-body-wide" ] || $PY scripts/scale_dataset_body.py $DATA "$RUNS/ct-body-wide" --factor 1.15
[ -d "$RUNS/ct-thin-noisy" ] || $PY scripts/resample_dataset.py $DATA "$RUNS/ct-thin-noisy" --spacing 0.8 0.8 1.5 --noise-hu 20
[ -d "$RUNS/ct-portal-venous" ] || $PY scripts/enhance_dataset_contrast.py $DATA "$RUNS/ct-portal-venous"
[ -d "$RUNS/ct-fatty-liver" ] || $PY scripts/enhance_dataset_contrast.py $DATA "$RUNS/ct-fatty-liver" --organ liver=-40
[ -d "$RUNS/ct-body-fat" ] || $PY scripts/add_body_fat.py $DATA "$RUNS/ct-body-fat" --fat-mm 40
[ -d "$RUNS/ct-body-fat-fov500" ] || $PY scripts/add_body_fat.py $DATA "$RUNS/ct-body-fat-fov500" --fat-mm 40 --fov-mm 500
[ -d "$RUNS/ct-anatomy-warped" ] || $PY scripts/deform_dataset_anatomy.py $DATA "$RUNS/ct-anatomy-warped" --max-mm 20 --spacing-mm 100
[ -d "$RUNS/ct-painted-mr-person" ] || $PY scripts/paint_ct_from_labels.py ../shared/data/mr-abdomen $DATA "$RUNS/ct-painted-mr-person"
# (fetched from PyPI: without it, these two rows keep their committed reports)
[ -d "$RUNS/ct-other-person-petct" ] || $PY scripts/make_petct_dataset.py "$RUNS/ct-other-person-petct" || true
[ -d "$RUNS/ct-other-person-petct-fatty-liver" ] || [ ! -d "$RUNS/ct-other-person-petct" ] || \
    $PY scripts/enhance_dataset_contrast.py "$RUNS/ct-other-person-petct" "$RUNS/ct-other-person-petct-fatty-liver" --organ liver=-40
[ -d "$RUNS/ct-oral-contrast" ] || $PY scripts/add_oral_contrast.py $DATA "$RUNS/ct-oral-contrast"
[ -d "$RUNS/ct-portal-venous-oral" ] || $PY scripts/enhance_dataset_contrast.py "$RUNS/ct-oral-contrast" "$RUNS/ct-portal-venous-oral"
[ -d "$RUNS/ct-portal-venous-liver-lesions" ] || \
    $PY scripts/add_liver_lesions.py "$RUNS/ct-portal-venous" "$RUNS/ct-portal-venous-liver-lesions" --z-mm 330 362
[ -d "$RUNS/ct-other-person-petct-oral" ] || [ ! -d "$RUNS/ct-other-person-petct" ] || \
    $PY scripts/add_oral_contrast.py "$RUNS/ct-other-person-petct" "$RUNS/ct-other-person-petct-oral"
report_dir() { [ "$1" = ct-painted-mr-person ] && echo docs/evaluation/ct-painted/mr-person || echo "docs/evaluation/$1"; }
for v in $ONLY; do
  [ "$v" = - ] && continue
  [ -d "$RUNS/$v" ] || { echo "$v: no dataset in $RUNS, not evaluated"; continue; }
  mkdir -p "$(report_dir $v)"
  card=(); case " ${INTO_CARD:-} " in *" $v "*) card=(--into-card) ;; esac
  $P evaluate $CT "$RUNS/$v" -n 8 --overwrite "${card[@]}" -o "$(report_dir $v)"
done
{
  echo "# The shipped CT model on other fields of view, resolutions, noise, body sizes and organ positions"
  echo
  echo "The same held-out slab of the one CT person (never trained on), presented as another protocol would: \`scripts/run_generalisation_test.sh\`."
  echo "8 proposals, 4 steps. Rows: as shipped (3 mm isotropic); cropped to z ≥ 250 mm (upper abdomen, another field of view);"
  echo "resampled to 1.5 × 1.5 × 5 mm with a 5 mm slice profile and 20 HU more noise (a thick-slice low-dose protocol);"
  echo "the same voxels with the in-plane spacing × 0.85 and × 1.15 (a body 15 % narrower or wider; \`scripts/scale_dataset_body.py\`);"
  echo "warped in-plane by a smooth random cubic B-spline (control points 100 mm apart, coefficients up to 20 mm: voxels move 4.8 mm on average,"
  echo "up to about 10 mm, so organs shift and bend against each other; \`scripts/deform_dataset_anatomy.py\`);"
  echo "resampled to 0.8 × 0.8 × 1.5 mm with 20 HU of noise added per voxel (a routine thin-slice protocol; the engine blurs a scan finer"
  echo "than its grid can show before resampling it, see the README's *Other resolutions*);"
  echo "contrast-enhanced as in a portal-venous phase, each labelled organ raised by a typical gain (aorta +120 HU, kidneys +120,"
  echo "IVC +90, spleen +70, pancreas +60, liver +55, portal vein +130; \`scripts/enhance_dataset_contrast.py\`): the training scan is unenhanced;"
  echo "with a fatty liver, the liver 40 HU darker than its own 46 HU (steatosis; \`scripts/enhance_dataset_contrast.py --organ liver=-40\`);"
  echo "a heavier body of the same build: 40 mm more subcutaneous fat (-100 HU under a 2 mm skin, with the scan's own noise), the organs unchanged,"
  echo "the body cut off where it now reaches the scan's 366 × 303 mm field of view (\`scripts/add_body_fat.py\`)."
  echo "The engine widens its 384 mm in-plane window for a body that reaches more than 24 mm past it (since 2026-12-07;"
  echo "[body-window](body-window/README.md)): of these, the body 1.15× as wide and the fat on a 500 mm field of view, each seen"
  echo "through 432 mm (72 px); before, their means were 0.703 and 0.658. The fat's row is that second presentation: the scan first widened to a"
  echo "500 mm field of view, so that the fat is whole (\`add_body_fat.py --fov-mm 500\`; a body 443 mm wide)."
  echo "One person: these eleven measure robustness to acquisition, body size and a smooth warp of the same anatomy, not to another person's anatomy (organ shapes, pathology)."
  echo "The last row is the nearest to that here: the MR person's labels painted as CT with the CT person's Hounsfield units, whole scan (60 mm of upper abdomen;"
  echo "\`scripts/paint_ct_from_labels.py\`). A painted scan has no gas, contents, ribs or texture, and its borders are its labels':"
  echo "[ct-painted](ct-painted/README.md) has the CT person painted the same way as a control, three seeds and what it cannot show."
  echo "The row after it is a real CT of another person, the only one here: the low-dose CT of a PET/CT (another scanner, 0.98 × 0.98 mm, 2 mm apart,"
  echo "contrast-enhanced, arms at the sides), 40 mm of upper abdomen without kidneys or gallbladder, whole slab, labels TotalSegmentator predictions"
  echo "(\`scripts/make_petct_dataset.py\`; [ct-other-person-petct](ct-other-person-petct/README.md) has three seeds and what it cannot show);"
  echo "the row after it is that scan with its liver 40 HU darker, a fatty liver as the training person's row above makes it."
  echo "The last three rows have positive oral contrast (250 HU with the scan's grain) in the lumen of the stomach, duodenum and small bowel,"
  echo "deeper than a 3 mm wall, gas left as it is (\`scripts/add_oral_contrast.py\`; [oral-contrast](oral-contrast/README.md)): the held-out slab"
  echo "unenhanced, the same contrast-enhanced as above (oral and IV contrast, the commonest abdominal protocol), and the PET/CT."
  echo "The very last row is the contrast-enhanced slab with five round liver lesions, 10-30 mm, 50 HU darker than the liver"
  echo "(metastases; \`scripts/add_liver_lesions.py --z-mm 330 362\`, the labels unchanged; [liver-lesions](liver-lesions/README.md))."
  for m in ranked_first consensus baseline; do
    echo; echo "## ${m/_/-} Dice"; echo
    $PY scripts/compare_reports.py --metric $m "as shipped=docs/evaluation/ct-abdomen" "upper-abdomen field of view=docs/evaluation/ct-upper-fov" \
      "5 mm slices + 20 HU noise=docs/evaluation/ct-thick-noisy" "body 0.85× as wide=docs/evaluation/ct-body-slim" \
      "body 1.15× as wide=docs/evaluation/ct-body-wide" "anatomy warped in-plane=docs/evaluation/ct-anatomy-warped" \
      "0.8 × 0.8 × 1.5 mm slices + 20 HU noise=docs/evaluation/ct-thin-noisy" \
      "contrast-enhanced (portal-venous)=docs/evaluation/ct-portal-venous" "fatty liver (40 HU darker)=docs/evaluation/ct-fatty-liver" \
      "40 mm more subcutaneous fat=docs/evaluation/ct-body-fat" \
      "40 mm more fat, 500 mm field of view (432 mm window)=docs/evaluation/ct-body-fat-fov500" \
      "another person's anatomy, painted as CT (whole scan)=docs/evaluation/ct-painted/mr-person" \
      "another person, a real PET/CT (upper abdomen, whole slab)=docs/evaluation/ct-other-person-petct" \
      "the same, fatty liver (40 HU darker)=docs/evaluation/ct-other-person-petct-fatty-liver" \
      "oral contrast=docs/evaluation/ct-oral-contrast" "oral + IV contrast (portal-venous)=docs/evaluation/ct-portal-venous-oral" \
      "the PET/CT person, oral contrast=docs/evaluation/ct-other-person-petct-oral" \
      "contrast-enhanced, five liver lesions=docs/evaluation/ct-portal-venous-liver-lesions"
  done
} > docs/evaluation/ct-generalisation.md
