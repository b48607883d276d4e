#!/usr/bin/env python3
"""A Markdown table of ranked-first Dice per organ from several `progidiff evaluate` reports.

example:
  python scripts/compare_reports.py "CT model alone=docs/evaluation/mr-ct-no-adapter" \
      "CT model + MR adapter=docs/evaluation/mr-adapter"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="LABEL=REPORT_DIR (a folder holding report.json)")
    p.add_argument("--metric", default="ranked_first", choices=["ranked_first", "consensus", "best_of_n", "randtop3", "baseline"])
    a = p.parse_args(argv)
    reps = []
    for item in a.reports:
        label, _, folder = item.partition("=")
        path = Path(folder) / "report.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no such report")
        reps.append((label, json.loads(path.read_text(encoding="utf-8"))))
    organs = list(dict.fromkeys(o for _, r in reps for o in r["organs"]))
    print("| | " + " | ".join(o.replace("_", " ") for o in organs) + " | mean |")
    print("|---|" + "---|" * (len(organs) + 1))
    for label, r in reps:
        cells = [f"{r['organs'][o][a.metric]['dice']:.3f}" if a.metric in r["organs"].get(o, {}) else "–" for o in organs]
        mean = r["mean_dice"].get(a.metric)
        print(f"| {label} | " + " | ".join(cells) + " | " + (f"**{mean:.3f}**" if mean is not None else "–") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
