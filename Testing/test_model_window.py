"""The model sees a fixed in-plane window (64 px x 6 mm = 384 mm for the shipped model) centred on the body.
Where an organ's ranked-first proposal reaches that window's edge and the scan goes on beyond it, segment
says so: the proposals stop at the edge whatever the organ does (a large person's spleen or liver)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from progidiff.card import window_cut_warning
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


def test_segment_warns_when_a_wide_body_s_spleen_meets_the_window_edge(tmp_path, caplog):
    """The shipped model on the sample CT with its in-plane spacing 1.6x as large (a body 580 mm wide: the
    spleen lies partly beyond the 384 mm window on the patient's left) warns in report.json and on the
    command line; on the sample as it is (363 mm wide) it says nothing."""
    import json
    import logging
    from pathlib import Path

    from progidiff import cli

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
        said = [r.getMessage() for r in caplog.records if "window" in r.getMessage()]
        assert said == ([window_cut_warning("spleen", ["left"], 384.0)] if cut else [])
