#!/usr/bin/env python3
"""Judge a candidate CT model against the shipped one by the criteria written for `ct-v14`
(docs/evaluation/fatty-liver/ct-v14-criteria.md), from `progidiff evaluate` reports of both.

The candidate's reports are CANDIDATE_DIR/<presentation>/report.json, one per presentation below (the
held-out slab is `ct-abdomen`; the others are `scripts/run_generalisation_test.sh`'s datasets, the bodies
1.3x and 1.45x as wide, and the PET/CT with a fatty liver), each written with evaluation seed 0, 8
proposals, 4 steps, e.g.:

    progidiff evaluate runs/ct-v16 runs/generalisation/ct-body-fat -n 8 --baseline none -o CANDIDATE_DIR/ct-body-fat

The shipped model's are the committed ones under docs/evaluation. Prints the table of ranked-first Dice
(shipped -> candidate) and each criterion's verdict as markdown; exits 0 whether or not it passes.

Example:
    python scripts/judge_candidate.py runs/external/v16/gen --name ct-v16
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Ranked-first Dice targets of issue #3.
TARGETS = {"liver": 0.85, "spleen": 0.75, "kidney_left": 0.75, "kidney_right": 0.75}
#: The 16 presentations, in the order of the ct-v14 table, and where the shipped model's report is.
PRESENTATIONS = {
    "ct-abdomen": "held-out slab as it is",
    "ct-upper-fov": "upper-abdomen field of view",
    "ct-thick-noisy": "5 mm slices + 20 HU noise",
    "ct-body-slim": "body 0.85× as wide",
    "ct-body-wide": "body 1.15× as wide (432 mm window)",
    "ct-anatomy-warped": "anatomy warped in-plane",
    "ct-thin-noisy": "0.8 × 0.8 × 1.5 mm slices + 20 HU noise",
    "ct-portal-venous": "contrast-enhanced (portal-venous)",
    "ct-fatty-liver": "fatty liver (40 HU darker)",
    "ct-body-fat": "40 mm more subcutaneous fat",
    "ct-body-fat-fov500": "the same, 500 mm field of view (432 mm window)",
    "ct-painted-mr-person": "another person's anatomy, painted as CT",
    "ct-other-person-petct": "**another person, a real PET/CT**",
    "ct-other-person-petct-fatty-liver": "**the same, fatty liver**",
    "ct-body-x1.3": "body 1.3× as wide (480 mm window)",
    "ct-body-x1.45": "body 1.45× as wide (528 mm window)",
}
SHIPPED_DIR = {"ct-painted-mr-person": "ct-painted/mr-person"}
FATTY = ("ct-fatty-liver", "ct-other-person-petct-fatty-liver")
COLUMNS = ("liver", "spleen", "kidney_left", "kidney_right", "stomach")


def ranked_first(report_dir: Path) -> dict[str, float]:
    """Each organ's ranked-first Dice in one evaluate report."""
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    return {organ: float(v["ranked_first"]["dice"]) for organ, v in report["organs"].items()}


def judge(shipped: dict[str, dict[str, float]], cand: dict[str, dict[str, float]]) -> tuple[list[str], bool]:
    """The markdown table and verdicts, and whether all four criteria hold."""
    lines = ["| presentation | liver | spleen | kidney L | kidney R | stomach | mean |", "|---|---|---|---|---|---|---|"]
    lost, means_a, means_b = [], [], []
    for name, label in PRESENTATIONS.items():
        a, b = shipped[name], cand[name]
        cells = []
        for organ in COLUMNS:
            if organ not in a:
                cells.append("–")
                continue
            cells.append(f"{a[organ]:.3f} → {b[organ]:.3f}")
            if organ in TARGETS and a[organ] >= TARGETS[organ] > b[organ]:
                lost.append(f"{name} {organ} {a[organ]:.3f} → {b[organ]:.3f}")
        ma, mb = sum(a.values()) / len(a), sum(b.values()) / len(b)
        means_a.append(ma)
        means_b.append(mb)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ma:.3f} → {mb:.3f} |")
    gains = {n: cand[n]["liver"] - shipped[n]["liver"] for n in FATTY}
    mean_a, mean_b = sum(means_a) / len(means_a), sum(means_b) / len(means_b)
    stomach = cand["ct-abdomen"]["stomach"]
    verdicts = [
        ("1. No target lost", not lost, "; ".join(lost) or "every liver, spleen and kidney target met before is met"),
        ("2. The fatty livers gain ≥ 0.03", all(g >= 0.03 for g in gains.values()),
         "; ".join(f"{n} {shipped[n]['liver']:.3f} → {cand[n]['liver']:.3f} ({g:+.3f})" for n, g in gains.items())),
        ("3. Overall within 0.01", mean_b >= mean_a - 0.01,
         f"the mean of the {len(means_a)} means is {mean_a:.3f} → {mean_b:.3f} ({mean_b - mean_a:+.3f})"),
        ("4. The slab's stomach ≥ 0.60", stomach >= 0.60, f"{stomach:.3f}"),
    ]
    lines += ["", "| criterion | | |", "|---|---|---|"]
    lines += [f"| {c} | {'holds' if ok else '**fails**'} | {why} |" for c, ok, why in verdicts]
    return lines, all(ok for _, ok, _ in verdicts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidate_dir", type=Path, help="folder of the candidate's reports, one subfolder per presentation")
    p.add_argument("--shipped-dir", type=Path, default=Path("docs/evaluation"),
                   help="the shipped model's reports (default: docs/evaluation)")
    p.add_argument("--name", default="the candidate", help="the candidate's name, for the verdict line")
    a = p.parse_args(argv)
    missing = [n for n in PRESENTATIONS if not (a.candidate_dir / n / "report.json").is_file()]
    missing += [f"shipped {n}" for n in PRESENTATIONS
                if not (a.shipped_dir / SHIPPED_DIR.get(n, n) / "report.json").is_file()]
    if missing:
        print(f"judge_candidate: no report for {', '.join(missing)}", file=sys.stderr)
        return 2
    shipped = {n: ranked_first(a.shipped_dir / SHIPPED_DIR.get(n, n)) for n in PRESENTATIONS}
    cand = {n: ranked_first(a.candidate_dir / n) for n in PRESENTATIONS}
    lines, ok = judge(shipped, cand)
    print("\n".join(lines))
    print(f"\n**{a.name} {'passes all four criteria' if ok else 'fails; the shipped model stays'}.**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
