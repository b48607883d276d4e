"""REVIEW CAREFULLY also where the proposals agree well below their agreement on the model's training data:
`evaluate --into-card` records that agreement per organ beside the Dice, `segment` reads it back from the card (or the
adapter's) and asks for review more than proposals.BELOW_USUAL below it."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
from conftest import quick_segment

from progidiff.alerts import review_warning
from progidiff.proposals import BELOW_USUAL, REVIEW_AGREEMENT, needs_review


def test_review_below_the_floor_or_well_below_the_usual():
    assert needs_review(REVIEW_AGREEMENT - 0.01) and not needs_review(REVIEW_AGREEMENT)
    assert needs_review(0.90, usual=0.95) and not needs_review(0.93, usual=0.95)
    assert not needs_review(0.95 - BELOW_USUAL, usual=0.95)   # strict, as the floor
    assert needs_review(0.5, usual=0.3)                        # the floor holds whatever the usual
    assert review_warning(0.70).startswith("The proposals disagree strongly (agreement 0.70, under 0.80)")
    assert "(agreement 0.90, against 0.95 there, as the model card records; more than 0.03 less)" in review_warning(0.90, 0.95)


def test_the_usual_is_the_training_dataset_s_or_the_adapter_s():
    from progidiff.engine import usual_agreement

    organs = lambda v: {"organs": {"liver": {"ranked_first_dice": 0.9, "agreement": v}}}
    card = {"training": {"dataset": "../data/ct-abdomen"},
            "metrics": {"ct-abdomen": organs(0.95), "ct-other": organs(0.70)}}
    assert usual_agreement(card, "liver") == 0.95          # its own training dataset's, not another set's
    assert usual_agreement(card, "spleen") is None
    assert usual_agreement({**card, "metrics": {"ct-other": organs(0.7)}}, "liver") is None
    older = {**card, "metrics": {"ct-abdomen": {"organs": {"liver": {"ranked_first_dice": 0.9}}}}}
    assert usual_agreement(older, "liver") is None          # a card written before agreement was recorded
    adapter = {"training": {"dataset": "mr-abdomen"}, "metrics": {"mr-abdomen": organs(0.85)}}
    assert usual_agreement({**card, "adapter": adapter}, "liver") == 0.85


@pytest.mark.slow
def test_evaluate_into_card_records_the_agreement_and_segment_reviews_below_it(tmp_path, tiny_dataset, tiny_model,
                                                                                ct_crop, caplog):
    from progidiff import cli

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    assert cli.main(["evaluate", str(model), str(tiny_dataset), "-n", "2", "--steps", "1", "--device", "cpu",
                     "--baseline", "none", "--into-card", "-o", str(tmp_path / "eval")]) == 0
    rep = json.loads((tmp_path / "eval" / "report.json").read_text(encoding="utf-8"))
    card = json.loads((model / "model_card.json").read_text(encoding="utf-8"))
    held = card["metrics"][tiny_dataset.name]["organs"]["liver"]
    assert held["agreement"] == pytest.approx(rep["organs"]["liver"]["agreement"])
    assert "| agreement |" in (model / "README.md").read_text(encoding="utf-8")

    # a second evaluation shows the card's agreement beside the cohort's
    assert cli.main(["evaluate", str(model), str(tiny_dataset), "-n", "2", "--steps", "1", "--device", "cpu",
                     "--baseline", "none", "-o", str(tmp_path / "eval2")]) == 0
    again = json.loads((tmp_path / "eval2" / "report.json").read_text(encoding="utf-8"))
    assert again["organs"]["liver"]["usual_agreement"] == pytest.approx(held["agreement"])
    row = next(ln for ln in (tmp_path / "eval2" / "report.md").read_text(encoding="utf-8").splitlines()
               if ln.startswith("| liver |"))
    assert row.endswith(f"| {again['organs']['liver']['agreement']:.3f} (model card {held['agreement']:.3f}) |")
    assert rep["organs"]["liver"]["usual_agreement"] is None   # the first ran before the card held it

    # segment reads it back: raised above what two proposals can reach, every liver is sent to review
    held["agreement"] = 1.0 + 2 * BELOW_USUAL
    (model / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="progidiff"):
        seg = quick_segment(ct_crop, "liver", tmp_path / "out", model)
    assert seg["usual_agreement"] == round(held["agreement"], 4) and seg["review"] is True
    said = review_warning(seg["agreement"], held["agreement"])
    assert {"codes": ["review"], "text": said} in seg["warnings"]
    assert said in [r.getMessage() for r in caplog.records]
    # another organ is held to its own agreement
    kid = quick_segment(ct_crop, "left kidney", tmp_path / "kidney", model)
    assert kid["usual_agreement"] == round(card["metrics"][tiny_dataset.name]["organs"]["kidney_left"]["agreement"], 4)
    assert kid["review"] == needs_review(kid["agreement"], kid["usual_agreement"])
