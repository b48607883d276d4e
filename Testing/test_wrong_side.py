"""A liver, gallbladder or spleen proposal on the wrong side of the body's midline is flagged: the scan's left and
right are then swapped in its header (a conversion error, far commoner than situs inversus), or the proposal is not
the organ. Measured on the sample CT mirrored in its header: liver +45, gallbladder +111, spleen -88 mm (+ = the
patient's left); as acquired -68, -70, +111."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import quick_segment

from progidiff.alerts import WRONG_SIDE_MM, find_alerts, is_wrong_side, swapped_kidney_warning, wrong_side_warning
from progidiff.engine import midline_offset_mm

CALM = dict(review=False, agreement=0.9, unseen_ends=[], window_cut=[], window_mm=384.0, median_hu=55.0,
            top_left_share=0.05)


def test_only_the_organs_of_one_side_and_only_past_the_margin():
    assert is_wrong_side("liver", WRONG_SIDE_MM + 1) and not is_wrong_side("liver", WRONG_SIDE_MM)
    assert is_wrong_side("gallbladder", 111.0) and not is_wrong_side("gallbladder", -3.0)   # the PET/CT's: near the midline
    assert is_wrong_side("spleen", -88.0) and not is_wrong_side("spleen", -WRONG_SIDE_MM)
    # the model puts a "left kidney" on the scan's left whatever the header says: its side tells nothing
    assert not is_wrong_side("kidney_left", -80.0) and not is_wrong_side("stomach", -80.0)
    assert not is_wrong_side("liver", None)


def test_the_alert_says_which_side_and_both_causes():
    (alert,) = find_alerts("liver", "Liver", **dict(CALM, midline_offset_mm=44.5))
    assert alert.codes == ("wrong side?",) and alert.phrase == "on the patient's left: left and right swapped?"
    assert alert.text == wrong_side_warning("liver", 44.5)
    assert alert.text.startswith("The liver proposal lies on the patient's left, 44 mm from the body's midline")
    assert "swapped in its header" in alert.text and "or the proposal is not the liver" in alert.text
    (spleen,) = find_alerts("spleen", "Spleen", **dict(CALM, median_hu=None, midline_offset_mm=-87.7))
    assert spleen.phrase == "on the patient's right: left and right swapped?"


def test_a_kidney_is_flagged_by_the_liver_s_side_not_its_own():
    (alert,) = find_alerts("kidney_left", "Left kidney", **dict(CALM, median_hu=None, top_left_share=None,
                                                                 midline_offset_mm=78.0, liver_offset_mm=42.0))
    assert alert.codes == ("sides swapped?",) and alert.text == swapped_kidney_warning("kidney_left", 42.0)
    assert "then this left kidney proposal is the patient's right kidney" in alert.text
    assert find_alerts("kidney_right", "Right kidney", **dict(CALM, median_hu=None, top_left_share=None,
                                                              liver_offset_mm=-67.0)) == []
    # the liver's side is read for the kidneys only
    assert find_alerts("spleen", "Spleen", **dict(CALM, median_hu=None, midline_offset_mm=110.0, liver_offset_mm=42.0)) == []


def test_the_offset_is_read_from_the_grid_s_centre_column():
    ref = sitk.Image(64, 64, 4, sitk.sitkUInt8)
    ref.SetSpacing((6.0, 6.0, 5.0))
    mask = np.zeros((4, 64, 64), bool)
    mask[:, 20:30, 10:20] = True      # columns 10..19: centre 14.5, the grid's 31.5 -> 17 columns right of it
    assert midline_offset_mm(mask, ref) == pytest.approx((14.5 - 31.5) * 6.0)
    assert midline_offset_mm(np.zeros_like(mask), ref) is None


@pytest.mark.slow
def test_segment_flags_the_spleen_and_kidney_of_a_scan_whose_header_swaps_left_and_right(tmp_path, ct_crop):
    img = sitk.ReadImage(str(ct_crop))
    mirrored = sitk.Flip(img, [True, False, False])
    mirrored.CopyInformation(img)          # the header kept: the anatomy now lies mirrored in the world
    sitk.WriteImage(mirrored, str(tmp_path / "mirrored.nii.gz"))
    as_acquired = quick_segment(ct_crop, "spleen", tmp_path / "ok")
    swapped = quick_segment(tmp_path / "mirrored.nii.gz", "spleen", tmp_path / "swapped")
    assert as_acquired["midline_offset_mm"] > WRONG_SIDE_MM
    assert not [w for w in as_acquired["warnings"] if "wrong side?" in w["codes"]]
    assert swapped["midline_offset_mm"] < -WRONG_SIDE_MM
    (said,) = [w["text"] for w in swapped["warnings"] if w["codes"] == ["wrong side?"]]
    assert said.startswith("The spleen proposal lies on the patient's right, ")
    # a kidney's own side follows the prompt; the liver's tells
    kidney = quick_segment(tmp_path / "mirrored.nii.gz", "left kidney", tmp_path / "kidney")
    assert kidney["liver_offset_mm"] > WRONG_SIDE_MM and kidney["timings"]["side_check"] > 0
    assert [w["codes"] for w in kidney["warnings"] if "sides swapped?" in w["codes"]] == [["sides swapped?"]]
    assert quick_segment(ct_crop, "left kidney", tmp_path / "kidney-ok")["liver_offset_mm"] < -WRONG_SIDE_MM
    # a patient lying askew (the header turned 20 degrees about the long axis) is no swap
    turn = np.radians(20.0)
    rot = np.array([[np.cos(turn), -np.sin(turn), 0.0], [np.sin(turn), np.cos(turn), 0.0], [0.0, 0.0, 1.0]])
    askew = sitk.Image(img)
    askew.SetDirection(tuple((rot @ np.array(img.GetDirection()).reshape(3, 3)).ravel()))
    sitk.WriteImage(askew, str(tmp_path / "askew.nii.gz"))
    turned = quick_segment(tmp_path / "askew.nii.gz", "spleen", tmp_path / "askew")
    assert turned["midline_offset_mm"] > WRONG_SIDE_MM and "wrong side?" not in str(turned["warnings"])


def test_the_kidney_side_check_reads_no_side_from_a_tip_of_liver(monkeypatch):
    """A scan that shows only the liver's lowest tip (the sample CT's lower half: 3 mL found) says nothing of
    the sides: a few voxels could lie on either side by chance."""
    from progidiff import engine as engine_mod

    ref = sitk.Image(64, 64, 10, sitk.sitkUInt8)
    ref.SetSpacing((6.0, 6.0, 5.0))
    probe = np.zeros((1, 10, 64, 64), np.float32)
    probe[0, :2, 30:34, 50:54] = 1.0          # 32 voxels x 0.36 mL: 11.5 mL, on the patient's left
    monkeypatch.setattr(engine_mod, "sample_proposals", lambda *a, **k: probe)

    class Stub:
        card = {"organs": ["liver", "kidney_left"]}
        vocabulary = {"liver": None}
        device = "cpu"
        _cheap_pass = engine_mod.Engine._cheap_pass

        def text_states(self, organ):
            return None

    res = type("R", (), {"organ": type("O", (), {"name": "kidney_left"})()})()
    p = dict(res=res, idx=np.arange(20), stack=np.zeros((20, 1)), coords=np.zeros(20), ref=ref, model=None)
    opts = engine_mod.SegmentOptions()
    assert engine_mod.Engine._liver_side(Stub(), p, opts, None, None) is None
    probe[0, :, 20:40, 36:56] = 1.0           # 4,000 voxels: 1,440 mL; columns 36-55, 14 left of the centre (31.5)
    assert engine_mod.Engine._liver_side(Stub(), p, opts, None, None) == pytest.approx(14 * 6.0)
