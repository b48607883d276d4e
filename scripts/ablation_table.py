#!/usr/bin/env python3
"""Turn the reports of scripts/run_ablation.sh into the Markdown page docs/evaluation/ablation/README.md.

example:
  python scripts/ablation_table.py runs/ablation > docs/evaluation/ablation/README.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VARIANTS = [("no-stage1", "no stage 1 (stage 2 from random init)"),
            ("stage1-masks", "stage 1 on organ masks (shape prior; the shipped recipe)"),
            ("stage1-images", "stage 1 on unlabelled slices (diffusion pre-training, no labels)"),
            ("stage1-masks-guidance", "stage 1 on masks + anatomical guidance (body-axis coordinate)")]
FOVS = [("full", "held-out slab, whole scan as input"), ("upper", "held-out slab, scan cropped to z ≥ 250 mm (upper abdomen)")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs")
    a = p.parse_args(argv)
    runs = Path(a.runs)
    reps = {(v, f): json.loads((runs / f"eval-{v}-{f}" / "report.json").read_text(encoding="utf-8"))
            for v, _ in VARIANTS for f, _ in FOVS if (runs / f"eval-{v}-{f}" / "report.json").is_file()}
    if not reps:
        raise SystemExit(f"{runs}: no eval-*/report.json")
    any_rep = next(iter(reps.values()))
    organs = list(any_rep["organs"])
    cards = {v: json.loads((runs / v / "model_card.json").read_text(encoding="utf-8")) for v, _ in VARIANTS
             if (runs / v / "model_card.json").is_file()}
    base_card = json.loads((runs / "baseline-unet" / "baseline_card.json").read_text(encoding="utf-8"))
    out = ["# Ablation: what makes the model generalise", "",
           "Measured with `scripts/run_ablation.sh` (every command is in it). Each variant is trained on "
           "`../shared/data/ct-abdomen` for the organs below with the same budget (stage 1 + stage 2 steps, batch "
           f"{base_card['training']['batch_size']}, base fine-tuned in stage 2, per-slice Dice loss) — far less than the shipped model — with the "
           "central 20 % slab of the organs held out. Scores: ranked-first Dice of 4 proposals (4 DPM-Solver++ steps) on the "
           "held-out slab, (a) with the whole scan as input and (b) with the scan cropped to the upper abdomen, the field of "
           "view another protocol might give: the slab is the same, but its position in the scan is not.", "",
           "One person, one scan, a short budget: differences of a few hundredths are within the noise of such runs.", ""]
    for f, fdesc in FOVS:
        out += [f"## {fdesc}", "", "| variant | train s | " + " | ".join(organs) + " | mean |",
                "|---|---|" + "---|" * (len(organs) + 1)]
        for v, vdesc in VARIANTS:
            r = reps.get((v, f))
            if r is None:
                continue
            secs = cards.get(v, {}).get("training", {}).get("seconds", float("nan"))
            out.append(f"| {vdesc} | {secs:.0f} | " + " | ".join(f"{r['organs'][o]['ranked_first']['dice']:.3f}" for o in organs)
                       + f" | **{r['mean_dice']['ranked_first']:.3f}** |")
        r = reps.get((VARIANTS[1][0], f)) or any_rep
        if "baseline" in r["mean_dice"]:
            out.append(f"| deterministic MONAI UNet baseline (same data, transforms, budget) | {base_card['training']['seconds']:.0f} | "
                       + " | ".join(f"{r['organs'][o]['baseline']['dice']:.3f}" for o in organs)
                       + f" | **{r['mean_dice']['baseline']:.3f}** |")
        out.append("")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
