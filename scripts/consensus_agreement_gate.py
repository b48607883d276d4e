#!/usr/bin/env python3
"""How the engine's agreement gate (the consensus is the ranked-first proposal where the proposals'
mean pairwise Dice is below a threshold, the majority vote elsewhere) would change the consensus,
per threshold, from `progidiff evaluate` reports whose consensus is the plain majority vote.

Each per-case row of a report holds the ranked-first Dice, the majority vote's Dice and the
proposals' agreement, so the gate needs no re-sampling: below the threshold the consensus Dice is
the ranked-first's. Reports written with the gate in place already hold its consensus; give the
ones written before it (docs/evaluation/ct-v8, docs/evaluation/ct-v10 and
docs/evaluation/ct-v12-body-scale-0.6-1.67 hold the shipped models' five presentations).

example:
  python scripts/consensus_agreement_gate.py ct-v10=docs/evaluation/ct-v10 ct-v12=docs/evaluation/ct-v12-body-scale-0.6-1.67
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def case_rows(folder: Path) -> list[tuple[float, float, float]]:
    """(agreement, ranked-first Dice, majority Dice) of every case x organ in the reports under ``folder``."""
    rows = []
    for path in sorted(folder.glob("*/report.json")) + sorted(folder.glob("report.json")):
        for c in json.loads(path.read_text(encoding="utf-8"))["cases"]:
            rows.append((c["agreement"], c["ranked_first"]["dice"], c["consensus"]["dice"]))
    return rows


def gate(rows: list[tuple[float, float, float]], threshold: float) -> dict:
    a = np.array(rows, dtype=float)
    fused = np.where(a[:, 0] < threshold, a[:, 1], a[:, 2])
    diff = fused - a[:, 1]
    return {"mean": float(diff.mean()), "below": int((diff < -1e-9).sum()), "pairs": len(a),
            "worst": float(diff.min()), "fallbacks": int((a[:, 0] < threshold).sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="LABEL=FOLDER (report.json files in FOLDER or its subfolders)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.4, 0.5, 0.6, 0.7, 0.8],
                   help="agreement thresholds to score (0 = the plain majority vote)")
    a = p.parse_args(argv)
    out = [f"`python scripts/consensus_agreement_gate.py {' '.join(a.models)}`", "",
           "| model | threshold | mean Dice − ranked-first | below ranked-first | worst | ranked-first used |",
           "|---|---|---|---|---|---|"]
    for item in a.models:
        label, _, folder = item.partition("=")
        rows = case_rows(Path(folder))
        if not rows:
            raise SystemExit(f"{folder}: no report.json there")
        for t in a.thresholds:
            g = gate(rows, t)
            out.append(f"| {label} | {t:g}{' (majority vote)' if t == 0 else ''} | {g['mean']:+.3f} | "
                       f"{g['below']} of {g['pairs']} | {g['worst']:+.3f} | {g['fallbacks']} |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
