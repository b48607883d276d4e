#!/usr/bin/env python3
"""Compare consensus rules on the proposals of the shipped model: per organ, the Dice of the
ranked-first proposal and of six ways to fuse the N proposals into one mask, on the held-out
slab of each dataset given. Why the engine's consensus is what it is, measured.

Rules: majority vote (voxels in at least half of the proposals); the engine's consensus (the
majority vote, or the ranked-first proposal where the proposals' mean pairwise Dice is below
CONSENSUS_MIN_AGREEMENT);
STAPLE (Warfield et al. 2004, SimpleITK), run twice, on the whole scan and on the proposals'
bounding box, because STAPLE estimates its prior from the region it is given; SIMPLE (Langerak
et al. 2010: drop the proposals whose Dice with the current majority is below mean - 1 SD,
repeat); shape-based averaging (Rohlfing & Maurer 2007: the mean signed distance map, inside
where <= 0). The runs/generalisation/* datasets are the ones scripts/run_generalisation_test.sh writes.

example:
  python scripts/compare_consensus_rules.py Resources/Models/progidiff-ct-abdomen \\
      ../shared/data/ct-abdomen runs/generalisation/ct-upper-fov > docs/evaluation/consensus-rules.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ProGiDiffSlicer"))
from progidiff.data import read_dataset, z_ranges  # noqa: E402
from progidiff.engine import Engine, SegmentOptions  # noqa: E402
from progidiff.evaluate import organ_label_values, slab_mask  # noqa: E402
from progidiff.proposals import CONSENSUS_MIN_AGREEMENT, bounding_box, consensus, engine_consensus, rank  # noqa: E402
from progidiff.volume import read_scan  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def staple(masks: np.ndarray, spacing) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.STAPLE([sitk.GetImageFromArray(m.astype(np.uint8)) for m in masks], 1.0)) >= 0.5


def staple_in_box(masks: np.ndarray, spacing) -> np.ndarray:
    out = np.zeros(masks.shape[1:], bool)
    if not masks.any():
        return out
    box = bounding_box(masks.any(0))
    out[box] = staple(masks[(slice(None),) + box], spacing)
    return out


def simple(masks: np.ndarray, spacing, alpha: float = 1.0) -> np.ndarray:
    use = np.ones(len(masks), bool)
    while True:
        estimate = consensus(masks[use])
        q = np.array([dice(m, estimate) for m in masks])
        new = use & (q >= q[use].mean() - alpha * q[use].std())
        if new.sum() == use.sum() or new.sum() < 2:
            return consensus(masks[use])
        use = new


def shape_average(masks: np.ndarray, spacing) -> np.ndarray:
    total = np.zeros(masks.shape[1:], np.float32)
    for m in masks:
        im = sitk.GetImageFromArray(m.astype(np.uint8))
        im.SetSpacing(spacing)
        total += sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(im, insideIsPositive=False, squaredDistance=False,
                                                                     useImageSpacing=True))
    return total <= 0  # Maurer's map is 0 on the mask's own boundary voxels


# Each rule: (proposals (N, Z, Y, X) bool, spacing x y z mm) -> fused mask (Z, Y, X) bool.
# The proposals arrive best-ranked first (Engine.segment), as engine_consensus expects.
RULES = {"majority": lambda m, sp: consensus(m),
         f"engine: majority, ranked-first below agreement {CONSENSUS_MIN_AGREEMENT:g}":
             lambda m, sp: engine_consensus(m, rank(m).agreement)[0],
         "STAPLE": staple, "STAPLE, proposals' box": staple_in_box, "SIMPLE": simple, "shape-based averaging": shape_average}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a ProGiDiff model folder (its card names the held-out slabs)")
    p.add_argument("datasets", nargs="+", help="nnU-Net-style folders; each case's held-out slab (model card) is scored")
    p.add_argument("-n", "--proposals", type=int, default=8, help="proposals per organ (default 8)")
    a = p.parse_args(argv)
    eng = Engine(a.model, device="cpu")
    holdout = eng.card.get("training", {}).get("holdout_z_mm", {})
    diffs = {r: [] for r in RULES}
    out = ["# Consensus rules compared", "",
           f"`python scripts/compare_consensus_rules.py {a.model} {' '.join(a.datasets)}`", "",
           f"Dice on each case's held-out slab, {a.proposals} proposals, the shipped model's default sampling. "
           "Ranked-first = the proposal with the highest mean Dice to the others.", ""]
    for ds in a.datasets:
        info = read_dataset(ds)
        for case in [c for c in info.cases if c.label is not None and c.name in holdout]:
            scan = read_scan(case.image)
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
            keep = slab_mask(scan.image, z_ranges(holdout[case.name]))
            out += [f"## {ds} ({case.name})", "", "| organ | agreement | ranked-first | " + " | ".join(RULES) + " |",
                    "|---|---|" + "---|" * (len(RULES) + 1)]
            for organ in eng.card.get("organs", []):
                ref = np.isin(label, organ_label_values(info.labels, eng.vocabulary, organ)) & keep
                if not ref.any():
                    continue
                res = eng.segment(scan, eng.vocabulary[organ].display, SegmentOptions(proposals=a.proposals))
                masks = res.masks
                first = dice(masks[0] & keep, ref)
                row = []
                for r, fuse in RULES.items():
                    d = dice(fuse(masks, scan.image.GetSpacing()) & keep, ref)
                    diffs[r].append(d - first)
                    row.append(f"{d:.3f}")
                out.append(f"| {organ} | {res.ranking.agreement:.3f} | {first:.3f} | " + " | ".join(row) + " |")
                print(f"{ds} {organ} done", file=sys.stderr, flush=True)
            out.append("")
    out += ["## Against the ranked-first proposal, over every organ and dataset above", "",
            "| rule | mean Dice − ranked-first | worse than ranked-first | worst |", "|---|---|---|---|"]
    for r, d in diffs.items():
        d = np.array(d)
        out.append(f"| {r} | {d.mean():+.3f} | {(d < 0).sum()} of {len(d)} | {d.min():+.3f} |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
