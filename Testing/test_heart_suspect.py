"""segment flags a liver proposal whose top lies left of the body's midline, where the heart sits on
the liver dome: the model never saw a heart, and on a chest CT with its heart made unenhanced the
liver proposal took 330-390 ml of it (docs/evaluation/ct-chest-cta)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from progidiff.engine import left_share_of_top
from progidiff.volume import GridSpec, label_to_model_grid, model_grid


def _body_and_blocks(direction: tuple[float, ...]) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """A 300 mm wide "body" placed 60 mm off the scan's centre, on a grid of ``direction``, and two masks
    given in world coordinates: a "dome" on the patient's right whose top is its highest part, and the
    same with a "heart" on the patient's left above it."""
    img = sitk.Image(160, 80, 40, sitk.sitkInt16)
    img.SetSpacing((3.0, 3.0, 3.0))
    img.SetDirection(direction)
    img.SetOrigin((20.0, -30.0, 0.0))
    centre = np.asarray(img.TransformIndexToPhysicalPoint((60, 40, 0)))   # 60 mm off the scan's centre column
    kji = np.stack(np.mgrid[:40, :80, :160], -1).astype(float)       # array order: k, j, i
    pts = np.asarray(img.GetOrigin()) + (kji[..., ::-1] * 3.0) @ np.asarray(direction, float).reshape(3, 3).T
    x, y, z = pts[..., 0] - centre[0], pts[..., 1] - centre[1], pts[..., 2]   # relative to the body's centre
    arr = np.where((x / 150) ** 2 + (y / 100) ** 2 <= 1, 40, -1000).astype(np.int16)
    body = sitk.GetImageFromArray(arr)
    body.CopyInformation(img)
    dome = (x > -120) & (x < -10) & (np.abs(y) < 50) & (z > 30) & (z < 90 - 0.3 * np.abs(x + 65))
    heart = dome | ((x > -30) & (x < 80) & (np.abs(y) < 50) & (z > 70) & (z < 110))
    out = []
    for m in (dome, heart):
        im = sitk.GetImageFromArray(m.astype(np.uint8))
        im.CopyInformation(img)
        out.append(im)
    return body, out[0], out[1]


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1)], ids=["LPS", "RAS"])
def test_the_share_is_read_left_of_the_body_s_midline_in_world_coordinates(direction):
    body, dome, heart = _body_and_blocks(direction)
    ref = model_grid(body, GridSpec((6.0, 6.0, 5.0), (64, 64)), "CT")
    on_dome, on_heart = left_share_of_top(label_to_model_grid(dome, ref), ref), left_share_of_top(label_to_model_grid(heart, ref), ref)
    assert on_dome == 0.0            # the dome lies wholly on the patient's right
    assert on_heart == pytest.approx(80 / 110, abs=0.04)   # the top 20 mm is the "heart", 80 of its 110 mm left
    assert left_share_of_top(np.zeros((4, 64, 64), bool), ref) is None


def test_the_share_counts_only_the_top_slices():
    ref = sitk.Image(8, 8, 10, sitk.sitkUInt8)
    ref.SetSpacing((6.0, 6.0, 5.0))
    mask = np.zeros((10, 8, 8), bool)
    mask[2:9, 2:6, 0:4] = True       # right of the midline (low x), slices 2..8
    mask[7:9, 2:6, 4:8] = True       # left of it, in the top two slices only
    assert left_share_of_top(mask, ref, top_mm=10.0) == 0.5
    assert left_share_of_top(mask, ref, top_mm=20.0) == pytest.approx(32 / 96)


@pytest.mark.slow
def test_segment_warns_when_the_liver_s_top_lies_left_of_the_midline(tmp_path, ct_crop, caplog, monkeypatch):
    """The report, the warning and the overview's title, with the share made to read as a heart's."""
    from progidiff import cli, engine, segment
    from progidiff.alerts import heart_warning

    out = tmp_path / "out"
    args = ["segment", str(ct_crop), "--prompt", "liver", "-n", "2", "--steps", "2", "--device", "cpu",
            "--modality", "CT", "-o"]
    monkeypatch.setattr(engine, "left_share_of_top", lambda mask, ref: 0.82)
    titles = []
    drawn = segment.render_overview
    monkeypatch.setattr(segment, "render_overview", lambda *a: titles.append(a[-1]) or drawn(*a))
    with caplog.at_level(logging.WARNING, logger="progidiff"):
        assert cli.main(args + [str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["top_left_share"] == 0.82 and report["heart_suspect"] is True
    assert [r.getMessage() for r in caplog.records if "midline" in r.getMessage()] == [heart_warning(0.82)]
    assert {"codes": ["heart?"], "text": heart_warning(0.82)} in report["warnings"]
    assert titles[-1].endswith(" · top left of the midline: the heart?")
    monkeypatch.setattr(engine, "left_share_of_top", lambda mask, ref: 0.06)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="progidiff"):
        assert cli.main(args + [str(tmp_path / "dome")]) == 0
    report = json.loads((tmp_path / "dome" / "report.json").read_text(encoding="utf-8"))
    assert report["heart_suspect"] is False and not [r for r in caplog.records if "midline" in r.getMessage()]
    assert cli.main(["segment", str(ct_crop), "--prompt", "spleen", "-n", "2", "--steps", "2", "--device", "cpu",
                     "--modality", "CT", "-o", str(tmp_path / "spleen")]) == 0
    spleen = json.loads((tmp_path / "spleen" / "report.json").read_text(encoding="utf-8"))
    assert spleen["top_left_share"] is None and spleen["heart_suspect"] is False


def test_evaluate_lists_the_warnings_beside_the_dice_and_compares_the_means():
    from progidiff.evaluate import _warnings

    case = lambda name, organ, dice, warnings: {"case": name, "organ": organ, "ranked_first": {"dice": dice},
                                                "warnings": warnings}
    rep = {"cases": [case("a", "liver", 0.79, ["unseen superior end", "heart?"]), case("a", "spleen", 0.90, []),
                     case("b", "liver", 0.60, ["review"]), case("b", "spleen", 0.86, [])]}
    text = "\n".join(_warnings(rep))
    assert "| liver | a | unseen superior end, heart? | 0.790 |" in text and "| liver | b | review | 0.600 |" in text
    assert "spleen" not in text
    assert "0.695 over the 2 pair(s) with a warning, 0.880 over the 2 without." in text
    rep["cases"] = [c for c in rep["cases"] if not c["warnings"]]
    assert _warnings(rep) == ["", "`segment` gave no warning on any of the 2 organ × case pairs."]
    assert _warnings({"cases": [{"case": "a", "organ": "liver", "ranked_first": {"dice": 0.9}}]}) == []   # an older report
