"""A cohort's usual split: `train --holdout-cases N` keeps N whole labelled cases out of training and
records them in the card; `evaluate` on the same dataset then scores those cases only (the ones the model
trained on whole would flatter it), and `--holdout-like` gives a baseline the same split."""
from __future__ import annotations

import json
import shutil

from progidiff.cli import main


def _cohort(tmp_path, tiny_dataset, n: int = 3):
    ds = tmp_path / "cohort"
    shutil.copytree(tiny_dataset, ds)
    for k in range(2, n + 1):
        shutil.copy(ds / "imagesTr" / "case_001_0000.nii.gz", ds / "imagesTr" / f"case_{k:03d}_0000.nii.gz")
        shutil.copy(ds / "labelsTr" / "case_001.nii.gz", ds / "labelsTr" / f"case_{k:03d}.nii.gz")
    return ds


def test_held_out_cases_are_not_trained_on_and_are_what_evaluate_scores(tmp_path, tiny_dataset, tiny_model, capsys):
    ds = _cohort(tmp_path, tiny_dataset)
    model = tmp_path / "m"
    fast = ["--init-from", str(tiny_model), "--organs", "liver", "--stage2-steps", "2", "--batch-size", "2"]
    assert main(["train", str(ds), "-o", str(model), "--holdout-cases", "1", *fast]) == 0
    t = json.loads((model / "model_card.json").read_text(encoding="utf-8"))["training"]
    assert len(t["holdout_cases"]) == 1 and len(t["cases"]) == 2
    assert not set(t["holdout_cases"]) & set(t["cases"])
    assert set(t["holdout_cases"]) | set(t["cases"]) == {"case_001", "case_002", "case_003"}
    assert f"whole cases: {t['holdout_cases'][0]}" in (model / "README.md").read_text(encoding="utf-8")
    # the same seed draws the same case; the split is in the card, not re-drawn by evaluate
    again = tmp_path / "m2"
    assert main(["train", str(ds), "-o", str(again), "--holdout-cases", "1", *fast]) == 0
    assert json.loads((again / "model_card.json").read_text(encoding="utf-8"))["training"]["holdout_cases"] == t["holdout_cases"]

    out = tmp_path / "eval"
    assert main(["evaluate", str(model), str(ds), "-n", "2", "--steps", "1", "--baseline", "none", "-o", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert list(rep["evaluated_on"]) == t["holdout_cases"]
    assert "held out from training" in rep["evaluated_on"][t["holdout_cases"][0]]
    assert sorted(rep["skipped_training_cases"]) == sorted(t["cases"])
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "not scored: 2 case(s) the model was trained on whole" in md
    # segment's warnings beside each score (the tiny model's proposals give some or none)
    assert all(isinstance(c["warnings"], list) for c in rep["cases"])
    assert ("Warnings `segment` gave" in md) == any(c["warnings"] for c in rep["cases"])

    # a baseline on the same split
    base = tmp_path / "m-baseline-unet"
    assert main(["train", str(ds), "-o", str(base), "--baseline", "unet", "--organs", "liver", "--holdout-like", str(model),
                 "--stage1-steps", "0", "--stage2-steps", "1", "--batch-size", "2"]) == 0
    b = json.loads((base / "baseline_card.json").read_text(encoding="utf-8"))["training"]
    assert b["holdout_cases"] == t["holdout_cases"] and sorted(b["cases"]) == sorted(t["cases"])


def test_a_split_that_leaves_nothing_or_asks_twice_is_one_line(tmp_path, tiny_dataset, tiny_model, capsys):
    ds = _cohort(tmp_path, tiny_dataset, n=2)
    out = tmp_path / "m"
    assert main(["train", str(ds), "-o", str(out), "--holdout-cases", "2", "--init-from", str(tiny_model)]) == 2
    err = capsys.readouterr().err
    assert "leaves nothing to train on" in err and "2 labelled case(s)" in err and "Traceback" not in err
    assert main(["train", str(ds), "-o", str(out), "--holdout-cases", "1", "--holdout-like", str(tiny_model),
                 "--init-from", str(tiny_model)]) == 2
    assert "not both" in capsys.readouterr().err
    assert not out.exists()
