"""A narrow body is seen zoomed: the model's window keeps its pixels but makes them finer, so the body fills it as a
body reaching volume.ZOOM_REACH_MM would. On the training scan made 0.7x as wide the shipped model then found the
stomach it had lost (0.077 -> 0.636), and made 0.6x as wide the stomach and aorta (0.000 -> 0.669, 0.787;
docs/evaluation/body-zoom).
A body cut by a small field of view is wider than it measures: it is neither zoomed nor called narrow."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import quick_segment
from test_model_window import _body_scan, rescaled_dataset
from test_scripts import _load

from progidiff.volume import (FOV_CUT_CONTACT_MM, MAX_ZOOM, ZOOM_REACH_MM, GridSpec, body_fov_cut, body_reach_mm,
                              body_window, body_zoom)

GRID = GridSpec((6.0, 6.0, 5.0), (64, 64))


def test_the_zoom_brings_a_narrow_reach_to_the_bound_continuously_and_within_the_cap():
    assert body_zoom(np.array([ZOOM_REACH_MM, 120.0])) == 1.0
    assert body_zoom(np.array([187.0, 142.0])) == 1.0                     # the training scan
    assert body_zoom(np.array([ZOOM_REACH_MM - 0.5, 100.0])) == pytest.approx(1.0, abs=0.004)   # no jump at the bound
    assert body_zoom(np.array([130.0, 100.0])) == pytest.approx(ZOOM_REACH_MM / 130.0)
    assert body_zoom(np.array([40.0, 30.0])) == MAX_ZOOM
    assert body_zoom(np.array([0.0, 0.0])) == 1.0                         # no body found: as the model's own
    assert body_zoom(np.array([130.0, 100.0]), fov_cut=True) == 1.0


def test_a_narrow_body_gets_finer_pixels_and_the_same_window_size_and_slices():
    narrow = _body_scan(240, depth_mm=180)
    assert body_reach_mm(narrow, "CT")[0] == pytest.approx(120, abs=8)
    assert not body_fov_cut(narrow, "CT")
    g = body_window(narrow, GRID, "CT")
    zoom = 6.0 / g.spacing[0]
    assert g.size == GRID.size and g.spacing[2] == 5.0 and g.spacing[0] == g.spacing[1]
    assert zoom == pytest.approx(ZOOM_REACH_MM / body_reach_mm(narrow, "CT")[0])
    # the zoomed window still holds the whole body
    assert (g.size[0] - 1) * g.spacing[0] / 2 > 120
    assert body_window(_body_scan(360), GRID, "CT") is GRID                # an ordinary adult: untouched


def _cut_to_field(image: sitk.Image, width_mm: float) -> sitk.Image:
    """``image`` cut left-right to a field of view ``width_mm`` wide, by the script that made the evaluation's."""
    return _load("crop_dataset_fov").crop_width(image, width_mm)


def test_a_body_cut_by_the_field_of_view_is_not_zoomed():
    body = _body_scan(360)
    cut = _cut_to_field(body, 260)
    assert body_reach_mm(cut, "CT")[0] < ZOOM_REACH_MM                      # it measures narrow ...
    assert body_fov_cut(cut, "CT") and not body_fov_cut(body, "CT")         # ... but the field cuts its sides
    assert body_window(cut, GRID, "CT") is GRID
    # a body that only grazes its field's edge (as the training scan does, over 64 mm) is still measured
    grazed = _cut_to_field(_body_scan(240, depth_mm=180), 236)
    assert not body_fov_cut(grazed, "CT") and FOV_CUT_CONTACT_MM > 64
    assert body_window(grazed, GRID, "CT").spacing[0] < 6.0


@pytest.mark.slow
def test_segment_zooms_a_narrowed_scan_and_not_one_cut_by_its_field(tmp_path, ct_crop):
    """The sample CT's crop made 0.65x as wide (header only) is zoomed and called narrow; the same crop cut to a
    270 mm field, which measures as narrow, is neither, and says the field cuts it."""
    img = sitk.ReadImage(str(ct_crop))
    narrow = sitk.Image(img)
    sx, sy, sz = img.GetSpacing()
    narrow.SetSpacing((sx * 0.65, sy * 0.65, sz))
    sitk.WriteImage(narrow, str(tmp_path / "narrow.nii.gz"))
    sitk.WriteImage(_cut_to_field(img, 270), str(tmp_path / "cut.nii.gz"))
    as_is = quick_segment(ct_crop, "liver", tmp_path / "as-is")
    made_narrow = quick_segment(tmp_path / "narrow.nii.gz", "liver", tmp_path / "narrow")
    cut = quick_segment(tmp_path / "cut.nii.gz", "liver", tmp_path / "cut")
    assert as_is["model_pixel_mm"] == 6.0 and not as_is["body_cut_by_fov"]
    assert made_narrow["model_pixel_mm"] == pytest.approx(6.0 * made_narrow["body_reach_mm"] / ZOOM_REACH_MM, abs=0.01)
    assert ["narrow body"] in [w["codes"] for w in made_narrow["warnings"]]
    assert cut["body_reach_mm"] < 145 and cut["body_cut_by_fov"] and cut["model_pixel_mm"] == 6.0
    assert ["narrow body"] not in [w["codes"] for w in cut["warnings"]]


def test_evaluate_reports_the_zoomed_window(tmp_path, tiny_dataset, tiny_model):
    """The crop made 0.6x as wide (header only; a case the tiny model did not train on) is seen through a window
    narrower than the model's 384 mm, and report.md says so."""
    import json

    from progidiff.evaluate import evaluate

    small = rescaled_dataset(tiny_dataset, tmp_path / "small", 0.6)
    rep = evaluate(str(tiny_model), str(small), tmp_path / "eval", proposals=2, steps=1, device="cpu", baseline=None)
    (window,) = {c["window_mm"] for c in rep["cases"]}
    assert rep["model_window_mm"] == 384.0 and window < 300.0
    text = (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    assert f"window zoomed for a narrow body (finer pixels): `case_002` {window:.0f} mm" in text
    assert json.loads((tmp_path / "eval" / "report.json").read_text(encoding="utf-8"))["cases"][0]["window_mm"] == window
