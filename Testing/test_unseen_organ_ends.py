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


def test_an_end_is_shown_where_the_organ_stops_inside_the_scan():
    from progidiff.engine import ends_shown
    from progidiff.volume import body_slices

    vol = np.zeros((12, 6, 6), np.float32)
    vol[1:11, 1:5, 1:5] = 0.5                  # body in slices 1..10 (the model grid runs inferior -> superior)
    body = body_slices(vol)
    organ = np.zeros((12, 6, 6), bool)
    organ[3:11, 2:4, 2:4] = True               # from slice 3 to the scan's last body slice
    assert ends_shown(organ, body, ["superior", "inferior"]) == ["inferior"]
    organ[10] = False                          # now it ends below the top: the scan shows its superior end
    assert ends_shown(organ, body, ["superior"]) == ["superior"]
    assert ends_shown(organ, body, []) == []
    assert ends_shown(np.zeros_like(organ), body, ["superior"]) == []


def test_segment_warns_only_where_the_scan_shows_an_end_the_card_says_was_never_seen(tmp_path, capsys, caplog):
    """The real model on the sample CT (the training person, femoral heads to T11-T12): the liver runs to
    the scan's top and stops well above its bottom. A card that says the superior end was never seen
    gives no warning there; one that says the inferior end was never seen does (report, CLI, overview)."""
    import logging

    from progidiff import cli
    from progidiff.engine import Engine

    shipped = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "progidiff-ct-abdomen"
    model = tmp_path / "model"
    shutil.copytree(shipped, model)
    sample = Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "sample-ct-abdomen.nii.gz"
    for ends, warned in ((["superior"], False), (["inferior"], True)):
        card = json.loads((model / "model_card.json").read_text(encoding="utf-8"))
        card["training"]["unseen_organ_ends"] = {"liver": ends}
        (model / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
        assert Engine(model, device="cpu").card["training"]["unseen_organ_ends"] == {"liver": ends}
        out = tmp_path / f"out-{ends[0]}"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="progidiff"):
            assert cli.main(["segment", str(sample), "--prompt", "liver", "-n", "2", "--steps", "2", "--model", str(model),
                             "--device", "cpu", "-o", str(out)]) == 0
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        assert report["unseen_organ_ends"] == (ends if warned else [])
        said = [r.getMessage() for r in caplog.records if "never saw" in r.getMessage()]
        assert said == (["The model never saw the inferior end of the liver in training (its training scans cut it "
                         "off there), and this scan shows it: check the proposals' bottom slices."] if warned else [])
