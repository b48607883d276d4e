#!/usr/bin/env python3
"""Would segment's REVIEW CAREFULLY fall on the poor segmentations, with and without the rule that also
asks for review where the proposals agree well below their agreement on the model's training data
(the model card's)?

Every per-case row of a `progidiff evaluate` report holds the proposals' agreement and the ranked-first
Dice, so the rule needs no re-sampling: it is applied here with the engine's own ``needs_review``, the
usual agreement per organ read from the model card as ``segment`` reads it. Prints, per margin, how many
organ x scan pairs each rule flags in each Dice band, and which pairs it adds or leaves unflagged among
the misses of the issue's targets (liver 0.85; spleen and kidneys 0.75). Then, at the engine's margin, what
the standing caveat on a weak organ (the card's held-out Dice under alerts.WEAK_ORGAN_DICE) adds, and which
pairs under Dice 0.7 are still told nothing by either.

example:
  python scripts/score_review_rule.py Resources/Models/progidiff-ct-abdomen \\
      slab=docs/evaluation/ct-abdomen/report.json painted=docs/evaluation/ct-painted/mr-person/report.json \\
      --margins 0.02 0.03 0.05
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ProGiDiffSlicer"))

from progidiff import proposals  # noqa: E402
from progidiff.alerts import WEAK_ORGAN_DICE  # noqa: E402
from progidiff.engine import held_out_dice, usual_agreement  # noqa: E402

TARGETS = {"liver": 0.85, "spleen": 0.75, "kidney_left": 0.75, "kidney_right": 0.75}
BANDS = [(0.0, 0.5), (0.5, 0.7), (0.7, 0.85), (0.85, 1.01)]


def rows(named_reports: list[tuple[str, Path]]) -> list[dict]:
    """One row per organ x case: where, organ, agreement, ranked-first Dice."""
    out = []
    for name, path in named_reports:
        cases = json.loads(path.read_text(encoding="utf-8"))["cases"]
        several = len({c["case"] for c in cases}) > 1
        for c in cases:
            out.append({"where": f"{name}:{c['case']}" if several else name,
                        "organ": c["organ"], "agreement": float(c["agreement"]), "dice": float(c["ranked_first"]["dice"])})
    return out


def flags(rs: list[dict], usual: dict[str, float | None], margin: float | None) -> list[bool]:
    """REVIEW per row: the floor alone (margin None), or the floor and ``margin`` below the usual."""
    return [proposals.needs_review(r["agreement"], None if margin is None else usual.get(r["organ"]),
                                   proposals.BELOW_USUAL if margin is None else margin) for r in rs]


def table(rs: list[dict], usual: dict, margins: list[float]) -> list[str]:
    rules = [("floor only", None)] + [(f"floor + {m:.2f} below usual", m) for m in margins]
    flagged = {label: flags(rs, usual, m) for label, m in rules}
    lines = ["| ranked-first Dice | pairs | " + " | ".join(label for label, _ in rules) + " |",
             "|---|---|" + "---|" * len(rules)]
    for lo, hi in BANDS:
        pick = [i for i, r in enumerate(rs) if lo <= r["dice"] < hi]
        lines.append(f"| {lo:.2f}–{min(hi, 1.0):.2f} | {len(pick)} | "
                     + " | ".join(str(sum(flagged[label][i] for i in pick)) for label, _ in rules) + " |")
    misses = [i for i, r in enumerate(rs) if r["organ"] in TARGETS and r["dice"] < TARGETS[r["organ"]]]
    lines.append(f"| **target misses** | {len(misses)} | "
                 + " | ".join(str(sum(flagged[label][i] for i in misses)) for label, _ in rules) + " |")
    mean = lambda xs: f"{sum(xs) / len(xs):.3f} ({len(xs)})" if xs else "–"
    for label, want in (("**mean Dice, flagged**", True), ("**mean Dice, not flagged**", False)):
        lines.append(f"| {label} | | " + " | ".join(mean([r["dice"] for r, f in zip(rs, flagged[lab]) if f == want])
                                                      for lab, _ in rules) + " |")
    lines += ["", "| scan | organ | agreement | usual | ranked-first Dice | target miss | "
              + " | ".join(label for label, _ in rules[1:]) + " |", "|---|---|---|---|---|---|" + "---|" * len(margins)]
    base = flagged["floor only"]
    for i, r in enumerate(rs):
        added = [flagged[label][i] and not base[i] for label, _ in rules[1:]]
        miss = r["organ"] in TARGETS and r["dice"] < TARGETS[r["organ"]]
        if any(added) or (miss and not base[i]):
            u = usual.get(r["organ"])
            lines.append(f"| {r['where']} | {r['organ']} | {r['agreement']:.3f} | {'–' if u is None else f'{u:.3f}'} | "
                         f"{r['dice']:.3f} | {'yes' if miss else ''} | " + " | ".join("added" if a else "" for a in added) + " |")
    return lines


def weak_organ_table(rs: list[dict], usual: dict, weak: dict[str, bool]) -> list[str]:
    """Per Dice band: pairs told REVIEW CAREFULLY (the engine's rule), told either that or that the organ is
    a rough draft (``weak``, per organ), and the pairs under 0.7 told neither."""
    review = flags(rs, usual, proposals.BELOW_USUAL)
    told = [f or weak.get(r["organ"], False) for r, f in zip(rs, review)]
    lines = ["", f"Weak organs (held-out Dice under {WEAK_ORGAN_DICE:.2f} in the card): "
             + (", ".join(sorted(o for o, w in weak.items() if w)) or "none"), "",
             "| ranked-first Dice | pairs | REVIEW CAREFULLY | REVIEW CAREFULLY or a rough draft |", "|---|---|---|---|"]
    for lo, hi in BANDS:
        pick = [i for i, r in enumerate(rs) if lo <= r["dice"] < hi]
        lines.append(f"| {lo:.2f}–{min(hi, 1.0):.2f} | {len(pick)} | {sum(review[i] for i in pick)} | "
                     f"{sum(told[i] for i in pick)} |")
    silent = [r for r, t in zip(rs, told) if not t and r["dice"] < 0.7]
    lines += ["", f"Under Dice 0.70 and told neither: {len(silent)}"]
    lines += [f"- {r['where']} {r['organ']}: Dice {r['dice']:.3f}, agreement {r['agreement']:.3f}" for r in silent]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="the model folder whose card holds the usual agreement per organ")
    ap.add_argument("reports", nargs="+", help="NAME=path/to/report.json of `progidiff evaluate` with that model")
    ap.add_argument("--margins", type=float, nargs="+", default=[proposals.BELOW_USUAL])
    a = ap.parse_args(argv)
    named = []
    for item in a.reports:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            print(f"score_review_rule: error: {item!r} is not NAME=path/to/report.json", file=sys.stderr)
            return 2
        named.append((name, Path(path)))
    card = json.loads((a.model / "model_card.json").read_text(encoding="utf-8"))
    rs = rows(named)
    usual = {o: usual_agreement(card, o) for o in {r["organ"] for r in rs}}
    print("\n".join(table(rs, usual, a.margins)))
    weak = {o: (d := held_out_dice(card, o)) is not None and d < WEAK_ORGAN_DICE for o in usual}
    print("\n".join(weak_organ_table(rs, usual, weak)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
