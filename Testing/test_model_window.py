"""The model sees a fixed in-plane window (64 px x 6 mm = 384 mm for the shipped model) centred on the body.
Where an organ's ranked-first proposal reaches that window's edge and the scan goes on beyond it, segment
says so: the proposals stop at the edge whatever the organ does (a large person's spleen or liver)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from progidiff.alerts import window_cut_warning
from progidiff.engine import window_sides_cut


def _image(width_mm: float, height_mm: float) -> sitk.Image:
    """A scan centred on (0, 0), 2 mm voxels, 3 slices."""
    size = (int(width_mm / 2) + 1, int(height_mm / 2) + 1, 3)
    img = sitk.Image(size, sitk.sitkInt16)
    img.SetSpacing((2.0, 2.0, 5.0))
    img.SetOrigin((-width_mm / 2, -height_mm / 2, 0.0))
    return img


def _window() -> sitk.Image:
    ref = sitk.Image((64, 64, 3), sitk.sitkUInt8)
    ref.SetSpacing((6.0, 6.0, 5.0))
    ref.SetOrigin((-189.0, -189.0, 0.0))   # 64 columns centred on x = 0: -189 ... +189 mm
    return ref


def test_a_side_is_cut_where_the_organ_reaches_the_window_edge_and_the_scan_goes_on():
    ref = _window()
    organ = np.zeros((3, 64, 64), bool)
    organ[1, 30:40, 50:64] = True                               # reaches the last column: world +x, the patient's left
    wide = _image(500, 300)                                     # 500 mm wide: goes on 61 mm past each side
    assert window_sides_cut(organ, ref, wide) == ["left"]
    assert window_sides_cut(organ, ref, _image(360, 300)) == []  # the scan ends inside the window: nothing cut
    organ[1, 30:40, 0:3] = True                                 # and the first column: the patient's right
    assert window_sides_cut(organ, ref, wide) == ["right", "left"]
    organ[:] = False
    organ[1, 60:64, 30:34] = True                               # the last row: world +y, the patient's back
    assert window_sides_cut(organ, ref, _image(300, 500)) == ["posterior"]
    assert window_sides_cut(organ, ref, wide) == []             # 300 mm deep: the scan ends before the window does
    organ[1, 0:2, 30:34] = True
    assert window_sides_cut(organ, ref, _image(300, 500)) == ["anterior", "posterior"]
    organ[:] = False
    organ[1, 20:40, 20:40] = True                               # well inside the window
    assert window_sides_cut(organ, ref, wide) == []
    assert window_sides_cut(np.zeros_like(organ), ref, wide) == []


def test_the_warning_names_the_sides_and_the_window():
    text = window_cut_warning("spleen", ["left"], 384.0)
    assert text.startswith("The spleen reaches the edge of the model's 384 mm window on the patient's left side,")
    assert "left and posterior sides" in window_cut_warning("liver", ["left", "posterior"], 384.0)


def test_segment_warns_when_a_wide_body_s_spleen_meets_the_window_edge(tmp_path, caplog, monkeypatch):
    """The shipped model on the sample CT with its in-plane spacing 1.6x as large (a body 580 mm wide: the
    spleen lies partly beyond 384 mm) with the window kept at the model's 384 mm, as it is where a body
    is wider than the widest window (MAX_WINDOW_FACTOR): report.json and the command line say so; on
    the sample as it is (363 mm wide) nothing is said. With the window widened (the default) the same
    wide scan's spleen lies inside it."""
    import json
    import logging
    from pathlib import Path

    from progidiff import cli, volume

    monkeypatch.setattr(volume, "MAX_WINDOW_FACTOR", 1.0)

    sample = Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "sample-ct-abdomen.nii.gz"
    wide = sitk.ReadImage(str(sample))
    sx, sy, sz = wide.GetSpacing()
    wide.SetSpacing((sx * 1.6, sy * 1.6, sz))
    wide_path = tmp_path / "wide.nii.gz"
    sitk.WriteImage(wide, str(wide_path))
    for scan, cut in ((wide_path, ["left"]), (sample, [])):
        out = tmp_path / f"out-{scan.name.split('.')[0]}"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="progidiff"):
            assert cli.main(["segment", str(scan), "--prompt", "spleen", "-n", "2", "--steps", "2", "--device", "cpu",
                             "--modality", "CT", "-o", str(out)]) == 0
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        assert report["cut_by_model_window"] == cut and report["model_window_mm"] == 384.0
        said = [r.getMessage() for r in caplog.records if "reaches the edge" in r.getMessage()]
        assert said == ([window_cut_warning("spleen", ["left"], 384.0)] if cut else [])
    monkeypatch.undo()
    out = tmp_path / "out-widened"
    assert cli.main(["segment", str(wide_path), "--prompt", "spleen", "-n", "2", "--steps", "2", "--device", "cpu",
                     "--modality", "CT", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["cut_by_model_window"] == [] and report["model_window_mm"] == 576.0


def _body_scan(width_mm: float, depth_mm: float = 260.0, table_mm: float = 0.0, arm_mm: float = 0.0) -> sitk.Image:
    """A CT of air with an elliptical water body (and, if asked, a CT table under it, 20 mm of plastic
    separated from the body by 30 mm of air, or an upper arm ``arm_mm`` across lying against the body's
    right side, pressed 10 mm into it as an arm at rest is), 4 mm voxels, 12 slices."""
    side = int(max(width_mm + 2 * arm_mm, table_mm, 400) / 4) + 20
    yy, xx = np.mgrid[:side, :side]
    c = (side - 1) / 2
    plane = np.full((side, side), -1000, np.int16)
    plane[((xx - c) * 4 / (width_mm / 2)) ** 2 + ((yy - c) * 4 / (depth_mm / 2)) ** 2 <= 1] = 40
    if arm_mm:
        arm_x = c - (width_mm / 2 + arm_mm / 2 - 10) / 4
        plane[((xx - arm_x) * 4 / (arm_mm / 2)) ** 2 + ((yy - c) * 4 / (arm_mm * 0.6)) ** 2 <= 1] = 40
    if table_mm:
        top = int(c + (depth_mm / 2 + 30) / 4)
        plane[top:top + 5, int(c - table_mm / 8):int(c + table_mm / 8)] = 100
    img = sitk.GetImageFromArray(np.repeat(plane[None], 12, 0))
    img.SetSpacing((4.0, 4.0, 5.0))
    img.SetOrigin((-c * 4, -c * 4, 0.0))
    return img


def test_the_window_widens_to_hold_a_wide_body_and_only_then():
    from progidiff.volume import MAX_WINDOW_FACTOR, GridSpec, body_reach_mm, body_window, largest_region

    grid = GridSpec((6.0, 6.0, 5.0), (64, 64))
    # 360 mm wide: inside the 384 mm window; 420 mm: 18 mm past each side, within the tolerance
    assert body_window(_body_scan(360), grid, "CT") is grid
    assert body_window(_body_scan(420), grid, "CT") is grid
    assert body_reach_mm(_body_scan(480), "CT")[0] == pytest.approx(240, abs=8)
    # 240 mm from the centre, 24 mm tolerated: 2 x 216 mm / 6 mm + 1 = 73 px, in steps of 8: 80
    assert body_window(_body_scan(480), grid, "CT").size == (80, 80)
    # a wide CT table under a narrow body does not count
    assert body_window(_body_scan(360, table_mm=560), grid, "CT") is grid
    # nor an arm lying against its side (PET/CT, trauma CT): one connected region with the body, reaching
    # 232 mm from its centre, for which the largest region alone widened the window to 432 mm
    armed = _body_scan(360, arm_mm=90)
    plane = sitk.GetArrayFromImage(armed)[0] > -500
    assert largest_region(plane).sum() == plane.sum()
    assert body_reach_mm(armed, "CT")[0] == pytest.approx(180, abs=12)
    assert body_window(armed, grid, "CT") is grid
    # the cap: twice the model's window
    assert body_window(_body_scan(1200), grid, "CT").size == (int(64 * MAX_WINDOW_FACTOR),) * 2
    # in steps of the network's multiple
    assert body_window(_body_scan(480), grid, "CT", multiple=16).size[0] % 16 == 0


def test_the_engine_samples_a_wide_body_on_the_wider_window_and_maps_it_back(tiny_engine):
    """The tiny model (32 px of 12 mm: a 384 mm window) on a body 560 mm wide: it samples a 48 px window
    (a multiple of its 8 px) and the proposals come back on the scan's own grid."""
    from progidiff.engine import SegmentOptions
    from progidiff.volume import Scan

    img = _body_scan(560)
    result = tiny_engine.segment(Scan(img, "wide"), "liver", SegmentOptions(proposals=2, steps=1, modality="CT"))
    assert result.grid.GetSize()[:2] == (48, 48) and result.grid.GetSpacing()[:2] == (12.0, 12.0)
    assert result.grid_masks.shape[-2:] == (48, 48)
    assert result.masks.shape == (2,) + sitk.GetArrayViewFromImage(img).shape
    narrow = tiny_engine.segment(Scan(_body_scan(360), "narrow"), "liver", SegmentOptions(proposals=1, steps=1, modality="CT"))
    assert narrow.grid.GetSize()[:2] == (32, 32)


def rescaled_dataset(tiny_dataset, out, factor: float):
    """A copy of the tiny dataset with its case's in-plane spacing (scan and label) multiplied by ``factor``
    (header only: a body that much wider), renamed so that it is not a case the tiny model trained on."""
    import shutil

    shutil.copytree(tiny_dataset, out)
    for sub, name in (("imagesTr", "case_001_0000.nii.gz"), ("labelsTr", "case_001.nii.gz")):
        img = sitk.ReadImage(str(out / sub / name))
        sx, sy, sz = img.GetSpacing()
        img.SetSpacing((sx * factor, sy * factor, sz))
        (out / sub / name).unlink()
        sitk.WriteImage(img, str(out / sub / name.replace("case_001", "case_002")))
    return out


def test_evaluate_reports_the_widened_window(tmp_path, tiny_dataset, tiny_model):
    """evaluate records each case's window; report.md names the cases seen through a wider one."""
    import json

    from progidiff.evaluate import evaluate

    wide = rescaled_dataset(tiny_dataset, tmp_path / "wide", 1.6)
    rep = evaluate(str(tiny_model), str(wide), tmp_path / "eval", proposals=2, steps=1, device="cpu", baseline=None)
    assert rep["model_window_mm"] == 384.0
    assert {c["window_mm"] for c in rep["cases"]} == {576.0}
    assert "window widened for a wide body: `case_002` 576 mm" in (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "eval" / "report.json").read_text(encoding="utf-8"))["cases"][0]["window_mm"] == 576.0
