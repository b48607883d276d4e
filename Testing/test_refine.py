"""Re-sampling around an expert's edits keeps the kept voxels exactly."""
import numpy as np
import pytest
import SimpleITK as sitk

from progidiff.cli import main
from progidiff.engine import SegmentOptions
from progidiff.volume import read_scan


def test_refine_keeps_the_kept_voxels(tiny_engine, ct_crop):
    scan = read_scan(ct_crop)
    shape = sitk.GetArrayViewFromImage(scan.image).shape
    edited = np.zeros(shape, bool)
    edited[10:30, 30:70, 20:60] = True
    keep = np.zeros(shape, bool)
    keep[15:20, 20:80, 10:70] = True  # a corrected band: some inside, some outside the edited mask
    res = tiny_engine.refine(scan, "liver", edited, keep, SegmentOptions(proposals=3, steps=3), strength=0.5)
    assert res.masks.shape == (3,) + shape
    for m in res.masks:
        np.testing.assert_array_equal(m[keep], edited[keep])
    assert len(res.diameters_mm) == 3


def test_refine_cli(tiny_model, ct_crop, tmp_path):
    img = sitk.ReadImage(str(ct_crop))
    arr = np.zeros(sitk.GetArrayViewFromImage(img).shape, np.uint8)
    arr[10:30, 30:70, 20:60] = 1
    for name, a in (("edited", arr), ("keep", np.ones_like(arr))):
        m = sitk.GetImageFromArray(a)
        m.CopyInformation(img)
        sitk.WriteImage(m, str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "out"
    assert main(["refine", str(ct_crop), "--prompt", "liver", "--mask", str(tmp_path / "edited.nii.gz"), "--keep",
                 str(tmp_path / "keep.nii.gz"), "-n", "2", "--steps", "2", "--model", str(tiny_model), "-o", str(out)]) == 0
    p1 = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "proposal_01.nii.gz")))
    np.testing.assert_array_equal(p1, arr)  # keep = everywhere: exactly the edited mask


def test_refine_refuses_a_label_map_or_a_mask_off_the_scan_in_one_line(tiny_model, ct_crop, tmp_path, capsys):
    """Several segments exported as one label map were taken, as their union, for the organ; a mask of another
    scan was called an empty keep mask."""
    img = sitk.ReadImage(str(ct_crop))
    arr = np.zeros(sitk.GetArrayViewFromImage(img).shape, np.uint8)
    arr[10:30, 30:70, 20:60] = 1
    labels = arr.copy()
    labels[10:30, 30:50, 20:40] = 5     # a second segment
    elsewhere = sitk.GetImageFromArray(arr)
    elsewhere.CopyInformation(img)
    elsewhere.SetOrigin(tuple(o + 1000.0 for o in img.GetOrigin()))
    for name, a in (("edited", arr), ("labels", labels)):
        m = sitk.GetImageFromArray(a)
        m.CopyInformation(img)
        sitk.WriteImage(m, str(tmp_path / f"{name}.nii.gz"))
    sitk.WriteImage(elsewhere, str(tmp_path / "elsewhere.nii.gz"))
    run = lambda mask, keep: main(["refine", str(ct_crop), "--prompt", "liver", "--mask", str(tmp_path / mask), "--keep",
                                   str(tmp_path / keep), "-n", "2", "--steps", "1", "--model", str(tiny_model),
                                   "-o", str(tmp_path / "out")])
    assert run("labels.nii.gz", "edited.nii.gz") == 2
    assert "labels.nii.gz: holds 2 labels (1, 5), not one mask; give a 0/1 mask" in capsys.readouterr().err
    assert run("edited.nii.gz", "elsewhere.nii.gz") == 2
    assert "elsewhere.nii.gz: lies wholly outside the scan; was it drawn on another scan?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluate_with_simulated_edits(tiny_model, tiny_dataset, tmp_path):
    """The evaluate report has every column, and the simulated edit never changes kept voxels."""
    import json

    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_model), str(tiny_dataset), "-n", "3", "--steps", "2", "--simulate-edits",
                 "-o", str(out)]) == 0
    # strict JSON: an undefined HD95 is null, never NaN
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(c))
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    for organ, o in rep["organs"].items():
        for m in ("ranked_first", "consensus", "best_of_n", "randtop3"):
            assert 0.0 <= o[m]["dice"] <= 1.0
        assert "ged" in o and o["edit"]["kept_voxels_unchanged"]
    # the tiny model saw the whole crop: the report must say so rather than pass it off as held out
    assert "TRAINED ON" in rep["evaluated_on"]["case_001"]


def test_undefined_hd95_is_null_in_json_and_a_dash_in_markdown():
    from progidiff.card import format_mm
    from progidiff.evaluate import strict_json

    rep = {"organs": {"pancreas": {"baseline": {"dice": 0.0, "hd95": float("nan")}}}, "steps": [1, float("inf")]}
    assert strict_json(rep) == {"organs": {"pancreas": {"baseline": {"dice": 0.0, "hd95": None}}}, "steps": [1, None]}
    assert format_mm(float("nan")) == format_mm(None) == "–" and format_mm(6.04) == "6.0"


def test_kept_voxels_far_from_the_proposals_survive(tiny_engine, ct_crop, monkeypatch):
    """The engine resamples only inside the box that can hold the organ; an expert's kept voxels
    outside that box are still written (the box grows to hold them)."""
    from progidiff import engine as engine_module

    scan = read_scan(ct_crop)
    shape = sitk.GetArrayViewFromImage(scan.image).shape
    # the proposals confined to a small box in one corner, the kept voxels in the opposite one
    monkeypatch.setattr(engine_module, "organ_box", lambda probs, ref, target: (slice(0, 5), slice(0, 5), slice(0, 5)))
    edited = np.zeros(shape, bool)
    keep = np.zeros(shape, bool)
    edited[-3:, -3:, -3:] = keep[-4:, -4:, -4:] = True
    res = tiny_engine.refine(scan, "liver", edited, keep, SegmentOptions(proposals=2, steps=2), strength=0.5)
    for m in res.masks:
        np.testing.assert_array_equal(m[keep], edited[keep])
