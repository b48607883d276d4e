#!/usr/bin/env python3
"""Ranked-first and consensus Dice of a model on the slices it trained on and on its held-out
slab, per organ: tells a learning failure (low on both) from a generalisation failure (high on
training slices, low on the held-out slab). `progidiff evaluate` scores the held-out slab only.

example:
  python scripts/score_train_vs_heldout.py runs/dice/sample ../shared/data/ct-abdomen -n 4
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ProGiDiffSlicer"))

from progidiff.data import read_dataset, z_ranges  # noqa: E402
from progidiff.engine import Engine, SegmentOptions  # noqa: E402
from progidiff.evaluate import dice_hd95, organ_label_values, slab_mask  # noqa: E402
from progidiff.volume import read_scan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("dataset")
    p.add_argument("-n", "--proposals", type=int, default=4)
    a = p.parse_args(argv)
    logging.disable(logging.WARNING)
    engine = Engine(a.model)
    info = read_dataset(a.dataset)
    holdout = engine.card.get("training", {}).get("holdout_z_mm", {})
    print("| case | organ | training slices: ranked-first | consensus | held-out slab: ranked-first | consensus |")
    print("|---|---|---|---|---|---|")
    for entry in [c for c in info.cases if c.label is not None]:
        scan = read_scan(entry.image)
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(entry.label)))
        held = slab_mask(scan.image, z_ranges(holdout.get(entry.name, [])))
        sp = tuple(scan.image.GetSpacing()[::-1])
        for organ in engine.card["organs"]:
            ref = np.isin(label, organ_label_values(info.labels, engine.vocabulary, organ))
            if not ref.any():
                continue
            res = engine.segment(scan, engine.vocabulary[organ].display, SegmentOptions(proposals=a.proposals))
            cells = [dice_hd95(m & part, ref & part, sp)[0] for part in (~held, held) for m in (res.masks[0], res.consensus)]
            print(f"| {entry.name} | {organ} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
