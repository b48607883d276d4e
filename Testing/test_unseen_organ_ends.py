"""The model card says which organ ends no training slice showed (a field of view that cuts an organ
off: the shipped model never saw the liver dome): train records it, the card prints it, and
scripts/record_unseen_organ_ends.py records the same for a model trained before train did."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from progidiff.card import render
from progidiff.data import PreparedCase, unseen_organ_ends

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "record_unseen_organ_ends.py"


def _case(name: str, organ_slices: dict[str, tuple[int, int]], body: tuple[int, int] = (1, 9), z0: float = 0.0) -> PreparedCase:
    """Ten 5 mm slices, body in slices body[0]..body[1], each organ in its slice range (inclusive)."""
    image = np.zeros((10, 8, 8), np.float32)
    image[body[0]:body[1] + 1, 2:6, 2:6] = 0.5
    masks = {}
    for organ, (lo, hi) in organ_slices.items():
        m = np.zeros((10, 8, 8), bool)
        m[lo:hi + 1, 3:5, 3:5] = True
        masks[organ] = m
    return PreparedCase(name, "CT", image, masks, z0 + 5.0 * np.arange(10), sitk.Image(), z0 + 5.0 * np.arange(10))


def test_an_end_is_unseen_only_where_every_case_cuts_the_organ_off():
    cut_top = _case("a", {"liver": (4, 9), "kidney_left": (2, 5), "aorta": (1, 9)})
    assert unseen_organ_ends([cut_top], ["liver", "kidney_left", "aorta"]) == {
        "liver": ["superior"], "aorta": ["inferior", "superior"]}
    # a second scan that shows the liver whole: the model has seen its dome
    whole = _case("b", {"liver": (3, 7)})
    assert unseen_organ_ends([cut_top, whole], ["liver"]) == {}
    # an organ no case holds is not reported (train refuses it anyway)
    assert unseen_organ_ends([cut_top], ["spleen"]) == {}


def test_a_held_out_slab_at_the_top_leaves_the_organ_s_top_unseen():
    case = _case("a", {"liver": (3, 7)})                      # whole within the body (slices 1..9)
    assert unseen_organ_ends([case], ["liver"]) == {}
    held_out = {"a": [[30.0, 50.0]]}                           # slices 6..9 (z 30..45 mm) held out
    assert unseen_organ_ends([case], ["liver"], held_out) == {"liver": ["superior"]}


def test_the_card_prints_the_unseen_ends():
    card = {"name": "m", "modality": "CT", "organs": ["liver", "spleen", "aorta"],
            "training": {"unseen_organ_ends": {"liver": ["superior"], "spleen": ["superior"], "aorta": ["inferior"]}}}
    text = render(card)
    assert "the inferior end of aorta; the superior end of liver, spleen" in text
    assert "Never seen in training" not in render({"name": "m", "training": {"unseen_organ_ends": {}}})


def test_train_records_the_crop_s_cut_liver_and_the_script_records_the_same(tmp_path, tiny_model):
    # the tiny model trains on slices 62..111 of the sample CT: the top cuts the liver (69..111), not
    # the left kidney (72..104)
    card = json.loads((tiny_model / "model_card.json").read_text(encoding="utf-8"))
    assert card["training"]["unseen_organ_ends"] == {"liver": ["superior"]}
    assert "the superior end of liver" in (tiny_model / "README.md").read_text(encoding="utf-8")

    model = tmp_path / "old-model"
    shutil.copytree(tiny_model, model)
    old = json.loads((model / "model_card.json").read_text(encoding="utf-8"))
    del old["training"]["unseen_organ_ends"]
    (model / "model_card.json").write_text(json.dumps(old), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("record_unseen_organ_ends", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(model)]) == 0
    again = json.loads((model / "model_card.json").read_text(encoding="utf-8"))
    assert again == card
    assert "the superior end of liver" in (model / "README.md").read_text(encoding="utf-8")
    assert mod.main([str(tmp_path / "nowhere")]) == 2
