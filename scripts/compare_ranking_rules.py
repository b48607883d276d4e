#!/usr/bin/env python3
"""Compare ways to rank a model's proposals: per organ, the Dice of the proposal each rule puts
first, on the held-out slab of each dataset given (or the whole scan of a dataset the model did not
train on), for one or more seeds. Why the engine ranks as it does, measured.

Rules (each scores every proposal; the highest is ranked first):
- agreement: mean Dice with the other proposals (the engine's rank);
- confidence: mean |2p - 1| of the proposal's decoded probabilities over the box of all proposals,
  so a proposal with many borderline pixels scores low;
- self-consistency: the proposal noised half-way back (strength 0.5) and denoised again with K other
  seeds; mean Dice between the proposal and those re-samples. A sample the model would draw again
  from its own neighbourhood scores high (costs K x half the sampling again);
- agreement x self-consistency, agreement x confidence: products.
Best-of-N (the oracle) is printed beside them.

examples:
  python scripts/compare_ranking_rules.py Resources/Models/progidiff-ct-abdomen \\
      ../shared/data/ct-abdomen runs/generalisation/ct-painted-mr-person --seeds 0 100 -o ranking.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ProGiDiffSlicer"))
import progidiff.engine as engine_mod  # noqa: E402
from progidiff.data import organ_label_values, read_dataset, read_label, z_ranges  # noqa: E402
from progidiff.engine import Engine, SegmentOptions  # noqa: E402
from progidiff.evaluate import slab_mask  # noqa: E402
from progidiff.proposals import bounding_box  # noqa: E402
from progidiff.sampling import sample_proposals  # noqa: E402
from progidiff.volume import read_scan  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


class Capture:
    """Wraps the engine's sample_proposals to keep the last call's arguments and probabilities
    (the engine returns masks only)."""

    def __init__(self):
        self.args = self.kwargs = self.probs = None

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.probs = sample_proposals(*args, **kwargs)
        return self.probs


def scores(cap: Capture, grid_masks: np.ndarray, agree: np.ndarray, order: list[int], k: int,
           strength: float) -> dict[str, np.ndarray]:
    """Each rule's score per proposal, in the engine's ranked order. grid_masks: (N, Z, H, W) ranked;
    agree: the engine's scores (mean Dice with the others on the scan's grid), ranked."""
    model, images, states = cap.args[:3]
    kw = {key: v for key, v in cap.kwargs.items() if key not in ("progress", "cancel")}
    idx_probs = cap.probs[order]                         # (N, S, H, W), ranked, sampled slices only
    n = len(order)
    gm = grid_masks[:, cap.slices]                       # the same slices of the (largest-component) masks
    box = bounding_box(gm.any(0))
    conf = np.array([np.abs(2 * p[box] - 1).mean() if gm.any() else 1.0 for p in idx_probs])
    cons = []
    for i in range(n):
        again = sample_proposals(model, images, states, [10_000 + 97 * i + j for j in range(k)],
                                 init_mask=gm[i].astype(np.float32), strength=strength, **kw)
        cons.append(np.mean([dice(gm[i], a > 0.5) for a in again]))
    cons = np.array(cons)
    return {"agreement": agree, "confidence": conf, "self-consistency": cons,
            "agreement x self-consistency": agree * cons, "agreement x confidence": agree * conf}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a ProGiDiff model folder (its card names the held-out slabs)")
    p.add_argument("datasets", nargs="+", help="nnU-Net-style folders: held-out slab of a training case, else whole scan")
    p.add_argument("-n", "--proposals", type=int, default=8, help="proposals per organ (default 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="first proposal's seed, one run each (default 0)")
    p.add_argument("--resamples", type=int, default=2, help="K re-samples per proposal for self-consistency (default 2)")
    p.add_argument("--strength", type=float, default=0.5, help="how far back the proposal is noised (default 0.5)")
    p.add_argument("--organs", nargs="+", help="only these organs")
    p.add_argument("-o", "--output", type=Path, help="write the Markdown here too")
    p.add_argument("--json", type=Path, help="write every proposal's scores and Dice here (to score other rules later)")
    a = p.parse_args(argv)
    eng = Engine(a.model, device="cpu")
    holdout = eng.card.get("training", {}).get("holdout_z_mm", {})
    cap = Capture()
    engine_mod.sample_proposals = cap
    orig_prepare, orig_slab = eng._prepare, eng._organ_slab
    seen = {}

    def prepare(*args, **kwargs):
        prepared = orig_prepare(*args, **kwargs)
        seen["idx"] = prepared["idx"]
        return prepared

    def organ_slab(*args, **kwargs):
        seen["idx"] = orig_slab(*args, **kwargs)
        return seen["idx"]
    eng._prepare, eng._organ_slab = prepare, organ_slab

    rows, lines, raw = [], [], []
    for seed in a.seeds:
        for ds in a.datasets:
            info = read_dataset(ds)
            for case in [c for c in info.cases if c.label is not None]:
                scan = read_scan(case.image)
                label = sitk.GetArrayFromImage(read_label(case, scan.image))
                keep = slab_mask(scan.image, z_ranges(holdout[case.name])) if case.name in holdout else np.ones(label.shape, bool)
                for organ in a.organs or eng.card.get("organs", []):
                    ref = np.isin(label, organ_label_values(info.labels, eng.vocabulary, organ)) & keep
                    if not ref.any():
                        continue
                    res = eng.segment(scan, eng.vocabulary[organ].display, SegmentOptions(proposals=a.proposals, seed=seed))
                    cap.slices = seen["idx"]  # the slices the engine sampled
                    order = [s - seed for s in res.seeds]  # capture index of each ranked proposal
                    sc = scores(cap, res.grid_masks, np.array(res.scores), order, a.resamples, a.strength)
                    truth = np.array([dice(m & keep, ref) for m in res.masks])
                    picks = {r: float(truth[int(np.argmax(v))]) for r, v in sc.items()}
                    rows.append((seed, Path(ds).name, case.name, organ, picks, float(truth.max())))
                    raw.append({"seed": seed, "dataset": Path(ds).name, "case": case.name, "organ": organ,
                                "dice": truth.tolist(), "scores": {r: v.tolist() for r, v in sc.items()}})
                    line = (f"| {seed} | {Path(ds).name} | {organ} | " + " | ".join(f"{v:.3f}" for v in picks.values())
                            + f" | {truth.max():.3f} |")
                    lines.append(line)
                    print(line, flush=True)
    rules = list(rows[0][4])
    out = ["# Ranking rules compared", "", f"`python scripts/compare_ranking_rules.py {' '.join(sys.argv[1:])}`", "",
           "Dice of the proposal each rule ranks first; the last column is the best of the proposals (oracle).", "",
           "| seed | dataset | organ | " + " | ".join(rules) + " | best of N |", "|---|---|---|" + "---|" * (len(rules) + 1)]
    out += lines
    out += ["", "| rule | mean Dice | − agreement's: mean | below agreement's | worst | above |", "|---|---|---|---|---|---|"]
    base = np.array([r[4]["agreement"] for r in rows])
    for r in rules:
        v = np.array([row[4][r] for row in rows])
        d = v - base
        out.append(f"| {r} | {v.mean():.3f} | {d.mean():+.4f} | {(d < -1e-9).sum()} of {len(d)} | {d.min():+.3f} | {(d > 1e-9).sum()} |")
    out.append(f"| best of N | {np.mean([r[5] for r in rows]):.3f} | | | | |")
    text = "\n".join(out)
    print(text)
    if a.output:
        a.output.write_text(text + "\n", encoding="utf-8")
    if a.json:
        a.json.write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
