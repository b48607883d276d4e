#!/usr/bin/env python3
"""Compare consensus rules on the proposals of a model: per organ, the Dice of the ranked-first
proposal and of seven ways to fuse the N proposals into one mask, on the held-out slab of each
dataset given, for one or more seeds. Why the engine's consensus is what it is, measured.

Rules: majority vote (voxels in at least half of the proposals); the majority vote, or the
ranked-first proposal where the proposals' mean pairwise Dice is below CONSENSUS_MIN_AGREEMENT (the
engine's rule before the current one); the engine's consensus (the ranked-first proposal without the
voxels fewer than a quarter of the proposals hold and with those three quarters hold; uncorrected below
CONSENSUS_MIN_AGREEMENT); STAPLE (Warfield et al. 2004, SimpleITK), run twice, on the whole scan and on
the proposals' bounding box, because STAPLE estimates its prior from the region it is given; SIMPLE
(Langerak et al. 2010: drop the proposals whose Dice with the current majority is below mean - 1 SD,
repeat); shape-based averaging (Rohlfing & Maurer 2007: the mean signed distance map, inside where <= 0).
--vote-grid adds the engine's rule with every keep / add share in eighths. The runs/generalisation/*
datasets are the ones scripts/run_generalisation_test.sh writes.

examples:
  python scripts/compare_consensus_rules.py Resources/Models/progidiff-ct-abdomen \\
      ../shared/data/ct-abdomen runs/generalisation/ct-upper-fov --seeds 0 100 --save-proposals runs/props
  # score again from the saved proposals, without sampling, with the grid of eighths
  python scripts/compare_consensus_rules.py --from-proposals runs/props --vote-grid
"""
from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ProGiDiffSlicer"))
from progidiff.data import read_dataset, z_ranges  # noqa: E402
from progidiff.engine import Engine, SegmentOptions  # noqa: E402
from progidiff.evaluate import organ_label_values, slab_mask  # noqa: E402
from progidiff.proposals import CONSENSUS_MIN_AGREEMENT, bounding_box, consensus, engine_consensus  # noqa: E402
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


HALF = Fraction(1, 2)  # keep = add = 1/2: the majority vote

# Each rule: (proposals (N, Z, Y, X) bool, best-ranked first as Engine.segment returns them; spacing
# x y z mm; their mean pairwise Dice) -> fused mask (Z, Y, X) bool.
RULES = {"majority": lambda m, sp, ag: consensus(m),
         f"majority, ranked-first below agreement {CONSENSUS_MIN_AGREEMENT:g} (the engine's before)":
             lambda m, sp, ag: engine_consensus(m, ag, HALF, HALF)[0],
         f"engine: vote-corrected ranked-first, uncorrected below agreement {CONSENSUS_MIN_AGREEMENT:g}":
             lambda m, sp, ag: engine_consensus(m, ag)[0],
         "STAPLE": lambda m, sp, ag: staple(m, sp), "STAPLE, proposals' box": lambda m, sp, ag: staple_in_box(m, sp),
         "SIMPLE": lambda m, sp, ag: simple(m, sp), "shape-based averaging": lambda m, sp, ag: shape_average(m, sp)}


def grid_rules() -> dict:
    """The engine's rule (gated) with every keep <= add share in eighths; keep = add = 1/2 is the
    gated majority vote, keep = 0 and add = 1 the ranked-first proposal."""
    out = {}
    for k in range(1, 5):
        for a in range(4, 8):
            keep, add = Fraction(k, 8), Fraction(a, 8)
            out[f"keep {keep}, add {add}"] = lambda m, sp, ag, keep=keep, add=add: engine_consensus(m, ag, keep, add)[0]
    return out


def sampled(model: str, datasets: list[str], seeds: list[int], proposals: int, save: Path | None):
    """(seed, dataset, case, organ, ranked proposals, reference, slab, spacing, agreement), sampled."""
    eng = Engine(model, device="cpu")
    holdout = eng.card.get("training", {}).get("holdout_z_mm", {})
    for seed in seeds:
        for ds in datasets:
            info = read_dataset(ds)
            for case in [c for c in info.cases if c.label is not None and c.name in holdout]:
                scan = read_scan(case.image)
                label = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
                keep = slab_mask(scan.image, z_ranges(holdout[case.name]))
                for organ in eng.card.get("organs", []):
                    ref = np.isin(label, organ_label_values(info.labels, eng.vocabulary, organ)) & keep
                    if not ref.any():
                        continue
                    res = eng.segment(scan, eng.vocabulary[organ].display, SegmentOptions(proposals=proposals, seed=seed))
                    sp = scan.image.GetSpacing()
                    if save:
                        folder = save / f"seed{seed}" / Path(ds).name / case.name
                        folder.mkdir(parents=True, exist_ok=True)
                        np.savez_compressed(folder / f"{organ}.npz", masks=res.masks, reference=ref, slab=keep,
                                            spacing=np.array(sp), agreement=res.ranking.agreement)
                    print(f"seed {seed} {ds} {organ} done", file=sys.stderr, flush=True)
                    yield seed, ds, case.name, organ, res.masks, ref, keep, sp, res.ranking.agreement


def saved(folders: list[Path]):
    """The same tuples, from the files --save-proposals wrote (FOLDER/seed<k>/<dataset>/<case>/<organ>.npz)."""
    for folder in folders:
        # organs in the order they were sampled (the model card's), seeds in numeric order
        for f in sorted(folder.glob("seed*/*/*/*.npz"), key=lambda f: (int(f.parts[-4][4:]),) + f.parts[-3:-1]
                        + (f.stat().st_mtime_ns,)):
            z = np.load(f)
            yield (int(f.parts[-4][4:]), f.parts[-3], f.parts[-2], f.stem, z["masks"], z["reference"], z["slab"],
                   tuple(float(v) for v in z["spacing"]), float(z["agreement"]))


def summary(diffs: dict) -> list[str]:
    out = ["| rule | mean Dice − ranked-first | worse than ranked-first | worst |", "|---|---|---|---|"]
    for r, d in diffs.items():
        d = np.array(d)
        out.append(f"| {r} | {d.mean():+.3f} | {(d < 0).sum()} of {len(d)} | {d.min():+.3f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="a ProGiDiff model folder (its card names the held-out slabs)")
    p.add_argument("datasets", nargs="*", help="nnU-Net-style folders; each case's held-out slab (model card) is scored")
    p.add_argument("-n", "--proposals", type=int, default=8, help="proposals per organ (default 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="first proposal's seed, one run each (default 0)")
    p.add_argument("--save-proposals", type=Path, metavar="DIR",
                   help="also write each organ's ranked proposals, reference and slab under DIR")
    p.add_argument("--from-proposals", type=Path, nargs="+", metavar="DIR",
                   help="score the proposals --save-proposals wrote instead of sampling (no model needed)")
    p.add_argument("--vote-grid", action="store_true", help="also score the engine's rule with shares in eighths")
    a = p.parse_args(argv)
    if a.from_proposals:
        items, source = saved(a.from_proposals), f"--from-proposals {' '.join(map(str, a.from_proposals))}"
    elif a.model and a.datasets:
        items = sampled(a.model, a.datasets, a.seeds, a.proposals, a.save_proposals)
        source = f"{a.model} {' '.join(a.datasets)} --seeds {' '.join(map(str, a.seeds))}"
    else:
        p.error("give a MODEL and DATASETs, or --from-proposals DIR")
    rules = RULES
    grid = grid_rules() if a.vote_grid else {}
    every = {**rules, **grid}
    diffs = {r: [] for r in every}
    out = ["# Consensus rules compared", "", f"`python scripts/compare_consensus_rules.py {source}"
           f"{' --vote-grid' if a.vote_grid else ''}`", "",
           "Dice on each case's held-out slab, the model's default sampling. "
           "Ranked-first = the proposal with the highest mean Dice to the others.", ""]
    section = None
    for seed, ds, case, organ, masks, ref, keep, sp, agreement in items:
        if section != (seed, ds, case):
            section = (seed, ds, case)
            out += ["", f"## seed {seed}: {ds} ({case})", "", "| organ | agreement | ranked-first | " + " | ".join(rules) + " |",
                    "|---|---|" + "---|" * (len(rules) + 1)]
        first = dice(masks[0] & keep, ref)
        row = []
        for r, fuse in every.items():
            d = dice(fuse(masks, sp, agreement) & keep, ref)
            diffs[r].append(d - first)
            if r in rules:
                row.append(f"{d:.3f}")
        out.append(f"| {organ} | {agreement:.3f} | {first:.3f} | " + " | ".join(row) + " |")
    if section is None:
        p.error("nothing to score: no held-out organ found (or no seed<k>/<dataset>/<case>/<organ>.npz under "
                "--from-proposals)")
    out += ["", "## Against the ranked-first proposal, over every organ, dataset and seed above", ""]
    out += summary({r: diffs[r] for r in rules})
    if grid:
        out += ["", "## The engine's rule with other shares (keep a ranked-first voxel held by at least `keep` of the "
                f"proposals, add any held by at least `add`; the ranked-first proposal below agreement "
                f"{CONSENSUS_MIN_AGREEMENT:g})", ""]
        out += summary({r: diffs[r] for r in grid})
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
