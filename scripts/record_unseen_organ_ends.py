#!/usr/bin/env python3
"""Record in a trained model's card which organ ends its training data never showed, as `progidiff
train` now does for every new model (model_card.json's training.unseen_organ_ends, and a line in the
card's README): for a model trained before it did. Reads the card's own training dataset, organs,
grid and held-out slabs; changes nothing else in the card.

examples:
  python scripts/record_unseen_organ_ends.py Resources/Models/progidiff-ct-abdomen
  # the dataset moved since training:
  python scripts/record_unseen_organ_ends.py runs/my-model --dataset /data/my-dataset
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ProGiDiffSlicer"))
from progidiff.card import unseen_ends_text, write_markdown  # noqa: E402
from progidiff.data import prepare_case, read_dataset, unseen_organ_ends  # noqa: E402
from progidiff.errors import ProGiDiffError  # noqa: E402
from progidiff.prompts import Vocabulary  # noqa: E402
from progidiff.volume import GridSpec  # noqa: E402


def record(model: Path, dataset: str | None = None) -> dict[str, list[str]]:
    path = model / "model_card.json"
    if not path.is_file():
        raise ProGiDiffError(f"{model}: no model_card.json (give a ProGiDiff model folder; adapters have no training scans).")
    card = json.loads(path.read_text(encoding="utf-8"))
    t = card.get("training", {})
    info = read_dataset(dataset or t.get("dataset", ""))
    vocab = Vocabulary.from_dict(card["vocabulary"])
    grid = GridSpec(tuple(card["grid"]["spacing_mm"]), tuple(card["grid"]["size"]))
    modality = card.get("modality")
    cases = [prepare_case(e, info.labels, vocab, grid, card["organs"], modality)
             for e in info.cases if e.label is not None and e.name in t.get("cases", [])]
    if not cases:
        raise ProGiDiffError(f"{info.root}: none of the card's training cases ({', '.join(t.get('cases', []))}) is there.")
    t["unseen_organ_ends"] = unseen_organ_ends(cases, card["organs"], t.get("holdout_z_mm"))
    card["training"] = t
    path.write_text(json.dumps(card, indent=2), encoding="utf-8")
    write_markdown(model)
    return t["unseen_organ_ends"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a ProGiDiff model folder (model_card.json)")
    p.add_argument("--dataset", help="the training dataset, where the card's path no longer finds it")
    a = p.parse_args(argv)
    try:
        ends = record(a.model, a.dataset)
    except ProGiDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(unseen_ends_text(ends) if ends else "every organ is seen whole in at least one training scan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
