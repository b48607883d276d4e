"""The dataset helpers behind the robustness evaluations (scripts/crop_dataset_fov.py,
scripts/resample_dataset.py, scripts/scale_dataset_body.py, scripts/deform_dataset_anatomy.py,
scripts/enhance_dataset_contrast.py, scripts/paint_ct_from_labels.py, scripts/add_body_fat.py,
scripts/set_structure_density.py, scripts/add_oral_contrast.py, scripts/add_liver_lesions.py, scripts/plot_dataset_slices.py):
the world geometry must survive, or a held-out slab would move; and the consensus-rule scorer."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from progidiff.proposals import rank

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _image(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)) -> tuple[sitk.Image, sitk.Image]:
    arr = np.full((30, 20, 24), -1000, np.int16)
    arr[10:20, 5:15, 6:18] = 50                       # a block of "tissue", z slices 10..19
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((3.0, 3.0, 3.0))
    img.SetOrigin((40.0, -20.0, 100.0))
    img.SetDirection(direction)
    lab = sitk.GetImageFromArray((arr > 0).astype(np.uint8))
    lab.CopyInformation(img)
    return img, lab


def _world_z_of_label(lab: sitk.Image) -> tuple[float, float]:
    k = np.nonzero(sitk.GetArrayViewFromImage(lab).any((1, 2)))[0]
    pick = lambda kk: lab.TransformIndexToPhysicalPoint((0, 0, int(kk)))[2]
    return pick(k.min()), pick(k.max())


def test_resampled_scan_keeps_the_world_position_of_the_organ():
    rs = _load("resample_dataset")
    img, lab = _image()
    thick_img = rs.resample(img, (1.5, 1.5, 6.0), label=False, noise=10.0)
    thick_lab = rs.resample(lab, (1.5, 1.5, 6.0), label=True)
    assert thick_img.GetSpacing() == (1.5, 1.5, 6.0) and thick_lab.GetSize() == (48, 40, 15)
    assert thick_img.GetDirection() == img.GetDirection()
    lo, hi = _world_z_of_label(lab)                   # 130 .. 157 mm (voxel centres)
    tlo, thi = _world_z_of_label(thick_lab)
    assert abs(tlo - lo) <= 3.0 and abs(thi - hi) <= 3.0
    a = sitk.GetArrayViewFromImage(thick_img)
    assert a.dtype == np.int16 and 0 < a[7, 20, 24] < 120   # tissue stays tissue (blurred, noisy)
    assert set(np.unique(sitk.GetArrayViewFromImage(thick_lab))) == {0, 1}


def test_cropped_scan_is_a_slab_of_the_same_voxels():
    cf = _load("crop_dataset_fov")
    img, _ = _image()
    out = cf.crop_z(img, 130.0, 160.0)
    assert out.GetSize()[2] == 11 and out.GetSpacing() == img.GetSpacing()
    assert abs(out.TransformIndexToPhysicalPoint((0, 0, 0))[2] - 130.0) < 1e-6
    assert np.array_equal(sitk.GetArrayViewFromImage(out), sitk.GetArrayViewFromImage(img)[10:21])


def test_a_field_cut_left_right_keeps_the_same_voxels_where_they_were():
    cf = _load("crop_dataset_fov")
    img, _ = _image()                                 # 24 columns of 3 mm along world x (mirrored: LPS)
    out = cf.crop_width(img, 30.0)
    assert out.GetSize() == (10, 20, 30) and out.GetSpacing() == img.GetSpacing()
    assert out.TransformIndexToPhysicalPoint((0, 0, 0)) == img.TransformIndexToPhysicalPoint((7, 0, 0))
    assert np.array_equal(sitk.GetArrayViewFromImage(out), sitk.GetArrayViewFromImage(img)[:, :, 7:17])
    assert cf.crop_width(img, 500.0).GetSize() == img.GetSize()   # a field wider than the scan: all of it


def _world_z_range(lab: sitk.Image) -> tuple[float, float]:
    """World z of the lowest and highest labelled voxel centre, whatever the axis order."""
    z = [lab.TransformIndexToPhysicalPoint([int(v) for v in kji[::-1]])[2]
         for kji in np.argwhere(sitk.GetArrayViewFromImage(lab))]
    return min(z), max(z)


def test_body_scaled_scan_is_wider_in_plane_only_with_the_same_voxels():
    sb = _load("scale_dataset_body")
    for direction in [(-1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 0, 1, 1, 0, 0, 0, 1, 0)]:  # axial; slices along array x
        img, lab = _image(direction)
        wide = sb.scale_in_plane(img, 1.15)
        slice_axis = int(np.argmax(np.abs(np.array(direction).reshape(3, 3)[2, :])))
        expect = [3.0 if a == slice_axis else 3.45 for a in range(3)]
        assert np.allclose(wide.GetSpacing(), expect)
        assert np.array_equal(sitk.GetArrayViewFromImage(wide), sitk.GetArrayViewFromImage(img))
        centre = [(n - 1) / 2 for n in img.GetSize()]
        assert np.allclose(wide.TransformContinuousIndexToPhysicalPoint(centre),
                           img.TransformContinuousIndexToPhysicalPoint(centre))
        assert np.allclose(_world_z_range(sb.scale_in_plane(lab, 1.15)), _world_z_range(lab))
    # the tissue block is 12 voxels across x: 36 mm, then 41.4 mm
    xs = lambda im: im.TransformIndexToPhysicalPoint((17, 0, 0))[0] - im.TransformIndexToPhysicalPoint((6, 0, 0))[0]
    img, _ = _image()
    assert abs(abs(xs(sb.scale_in_plane(img, 1.15))) - 1.15 * abs(xs(img))) < 1e-6


def test_added_fat_grows_the_body_outward_only_and_leaves_the_inside_alone():
    bf = _load("add_body_fat")
    img, _ = _image()
    fat = bf.add_fat(img, 6.0, np.random.default_rng(0))
    before, after = sitk.GetArrayViewFromImage(img), sitk.GetArrayViewFromImage(fat)
    assert fat.GetSize() == img.GetSize() and fat.GetOrigin() == img.GetOrigin() and fat.GetPixelID() == img.GetPixelID()
    body = before > -400
    assert np.array_equal(after[body], before[body])          # every body voxel (organs included) unchanged
    ring = (after > -400) & ~body
    # 6 mm (2 voxels at 3 mm) around the block on its slices, none above or below it (slices are 2D)
    assert ring[10:20].any() and not ring[:10].any() and not ring[20:].any()
    assert ring[15, 3, 6:18].all() and not ring[15, 2, 6:18].any()
    # fat next to the body, skin at the outside (the test image's air has no noise, nor has what is added)
    assert after[15, 4, 10] == bf.FAT_HU and after[15, 3, 10] == bf.SKIN_HU


def test_fat_taken_away_moves_the_outline_inward_through_the_fat_only():
    bf = _load("add_body_fat")
    # a round trunk, 1 mm voxels: muscle (50 HU) to radius 30 mm, fat (-100 HU) to 50 mm, skin to 52 mm
    yy, xx = np.mgrid[:120, :120]
    r = np.hypot(yy - 60, xx - 60)
    sl = np.where(r <= 52, 30, -1000).astype(np.float32)
    sl[r <= 50] = -100
    sl[r <= 30] = 50
    arr = np.stack([sl] * 3)
    muscle = arr > 40

    def outline_radius(a: np.ndarray) -> float:
        return float(r[a[1] > -400].max())

    thin = arr.copy()
    taken = bf.strip_fat(thin, 12.0, 0.0, -1000.0, (1.0, 1.0), np.random.default_rng(0))
    assert taken > 0 and np.array_equal(thin[muscle], arr[muscle])    # the muscle and all inside it kept
    assert abs(outline_radius(thin) - 40.0) <= 1.5                     # 12 mm off a 52 mm body
    assert np.isin(arr[(thin < -900) & (arr > -900)], (-100, 30)).all()  # only fat (and the old skin) became air
    edge = (thin[1] > -400) & (r > outline_radius(thin) - 1)
    assert (thin[1][edge] == bf.SKIN_HU).mean() > 0.9                  # a skin on the new outline

    lean = arr.copy()
    bf.strip_fat(lean, 100.0, 0.0, -1000.0, (1.0, 1.0), np.random.default_rng(0))
    assert np.array_equal(lean[muscle], arr[muscle])
    # never closer than KEEP_FAT_MM to the muscle wall
    assert 30.0 + bf.KEEP_FAT_MM - 1.5 <= outline_radius(lean) <= 30.0 + bf.KEEP_FAT_MM + 1.5


def test_a_widened_field_of_view_keeps_every_voxel_where_it_was_and_the_label_on_its_grid():
    bf = _load("add_body_fat")
    img, lab = _image()                                  # 24 x 20 voxels of 3 mm: 72 x 60 mm
    wide = bf.pad_fov(img, 120.0, -1000)
    wide_lab = bf.pad_fov(lab, 120.0, 0)
    assert wide.GetSize() == (24 + 2 * 8, 20 + 2 * 10, 30)  # at least 120 mm each way, evenly on both sides
    assert wide_lab.GetSize() == wide.GetSize() and wide_lab.GetOrigin() == wide.GetOrigin()
    for ijk in ((0, 0, 0), (23, 19, 29), (6, 5, 10)):      # the old voxels keep their world positions and values
        shifted = (ijk[0] + 8, ijk[1] + 10, ijk[2])
        assert np.allclose(img.TransformIndexToPhysicalPoint(ijk), wide.TransformIndexToPhysicalPoint(shifted))
        assert img[ijk] == wide[shifted] and lab[ijk] == wide_lab[shifted]
    fat = bf.add_fat(img, 6.0, np.random.default_rng(0), fov_mm=120.0)
    assert fat.GetSize() == wide.GetSize() and fat.GetOrigin() == wide.GetOrigin()
    assert bf.pad_fov(img, 30.0, -1000).GetSize() == img.GetSize()   # already wider: unchanged


def test_anatomy_warp_moves_organs_in_plane_only_and_alike_in_scan_and_label():
    da = _load("deform_dataset_anatomy")
    img, lab = _image()
    warped, warped_lab = da.deform(img, False, 6.0, 30.0, 0), da.deform(lab, True, 6.0, 30.0, 0)
    for w, o in ((warped, img), (warped_lab, lab)):
        assert w.GetSize() == o.GetSize() and w.GetSpacing() == o.GetSpacing() and w.GetOrigin() == o.GetOrigin()
        assert w.GetPixelID() == o.GetPixelID()
    arr, lab_arr = sitk.GetArrayViewFromImage(warped), sitk.GetArrayViewFromImage(warped_lab).astype(bool)
    # the block moved: the label changed, and the scan moved with it (tissue where the label is)
    assert not np.array_equal(lab_arr, sitk.GetArrayViewFromImage(lab).astype(bool))
    assert (arr[lab_arr] > -500).mean() > 0.95 and (arr[~lab_arr] < -500).mean() > 0.95
    # nothing moves along z: the block still spans the same slices, and every point keeps its world z
    assert np.allclose(_world_z_of_label(warped_lab), _world_z_of_label(lab))
    t = da.warp(img, 6.0, 30.0, 0)
    moves = np.array([np.subtract(t.TransformPoint(img.TransformIndexToPhysicalPoint((i, j, k))),
                                  img.TransformIndexToPhysicalPoint((i, j, k))) for i, j, k in [(3, 4, 5), (12, 10, 15), (20, 15, 25)]])
    assert np.all(moves[:, 2] == 0) and np.abs(moves[:, :2]).max() <= 6.0 and np.abs(moves[:, :2]).max() > 0.1
    mean, most = da.displacement_mm(img, t, samples=200)
    assert 0.1 < mean <= most <= 6.0 * np.sqrt(2)
    # the same seed gives the same warp (so scan and label match); another seed another one
    assert np.array_equal(sitk.GetArrayFromImage(da.deform(lab, True, 6.0, 30.0, 0)), lab_arr.astype(np.uint8))
    assert not np.array_equal(sitk.GetArrayFromImage(da.deform(lab, True, 6.0, 30.0, 1)), lab_arr.astype(np.uint8))


def test_contrast_enhancement_raises_each_labelled_organ_by_its_own_gain_and_nothing_else():
    ec = _load("enhance_dataset_contrast")
    img, lab = _image()
    lab_arr = sitk.GetArrayFromImage(lab)
    lab_arr[10:20, 5:15, 12:18] = 2                   # half the block is "kidney", half "liver"
    two = sitk.GetImageFromArray(lab_arr)
    two.CopyInformation(img)
    out = ec.enhance(img, two, {"liver": 1, "kidney_left": 2, "gallbladder": 3}, blur_mm=0.0, scale=1.0)
    a, b = sitk.GetArrayViewFromImage(img).astype(int), sitk.GetArrayViewFromImage(out).astype(int)
    assert out.GetPixelID() == sitk.sitkInt16 and out.GetOrigin() == img.GetOrigin() and out.GetDirection() == img.GetDirection()
    assert np.all((b - a)[lab_arr == 1] == ec.ENHANCEMENT_HU["liver"])
    assert np.all((b - a)[lab_arr == 2] == ec.ENHANCEMENT_HU["kidney_left"])
    assert np.all(b[lab_arr == 0] == a[lab_arr == 0])
    # with the border blur the organ keeps most of its gain and air far from it gains nothing
    soft = sitk.GetArrayFromImage(ec.enhance(img, two, {"liver": 1}, blur_mm=3.0, scale=0.5)).astype(int) - a
    assert 0.5 * 55 * 0.5 < np.median(soft[lab_arr == 1]) <= 55 * 0.5 and np.all(soft[:3] == 0)


def test_organ_option_changes_only_the_named_structures_and_refuses_unknown_ones(tmp_path, capsys):
    """--organ liver=-40: a fatty liver; the contrast table is not applied; a misspelt name is a
    one-line error with nothing written."""
    ec = _load("enhance_dataset_contrast")
    img, lab = _image()
    lab_arr = sitk.GetArrayFromImage(lab)
    lab_arr[10:20, 5:15, 12:18] = 2
    two = sitk.GetImageFromArray(lab_arr)
    two.CopyInformation(img)
    _write_dataset(tmp_path / "src", "c1", img, two, {"background": 0, "liver": 1, "kidney_left": 2}, "CT")
    assert ec.main([str(tmp_path / "src"), str(tmp_path / "out"), "--organ", "liver=-40", "--blur-mm", "0"]) == 0
    a = sitk.GetArrayFromImage(img).astype(int)
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "imagesTr" / "c1_0000.nii.gz"))).astype(int)
    assert np.all((b - a)[lab_arr == 1] == -40) and np.all(b[lab_arr != 1] == a[lab_arr != 1])
    assert ec.main([str(tmp_path / "src"), str(tmp_path / "bad"), "--organ", "livr=-40"]) == 2
    assert "livr" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def _write_dataset(root: Path, case: str, img: sitk.Image, lab: sitk.Image, labels: dict[str, int], channel: str) -> None:
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    sitk.WriteImage(img, str(root / "imagesTr" / f"{case}_0000.nii.gz"))
    sitk.WriteImage(lab, str(root / "labelsTr" / f"{case}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": channel}, "labels": labels}))


def _body(fat: int, muscle: int, liver: int, air: int, gas: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A 'body' on a 24 x 40 x 40 grid: a fat disc holding a liver block and a muscle block (labels 1 and 2),
    with an unlabelled soft-tissue block and, with ``gas``, an unlabelled pocket of air (bowel gas);
    intensities as given."""
    zz, yy, xx = np.mgrid[:24, :40, :40]
    img = np.full((24, 40, 40), air, np.int16)
    img[(yy - 20) ** 2 + (xx - 20) ** 2 < 17 ** 2] = fat
    lab = np.zeros(img.shape, np.uint8)
    lab[:, 10:20, 8:20], lab[:, 24:30, 16:26] = 1, 2
    img[lab == 1], img[lab == 2] = liver, muscle
    img[:, 10:20, 24:30] = muscle                      # unlabelled soft tissue, like the muscle
    if gas:                                            # about 3 % of the unlabelled body
        img[:, 31:35, 10:15] = air
    return img, lab


def test_painted_ct_takes_each_structure_s_hu_from_the_reference_and_tells_fat_from_soft_tissue(tmp_path):
    pc = _load("paint_ct_from_labels")
    labels = {"background": 0, "liver": 1, "autochthon_left": 2}
    rng = np.random.default_rng(0)
    ref_arr, ref_lab = _body(fat=-100, muscle=20, liver=55, air=-1000, gas=True)
    ref_arr = (ref_arr + rng.normal(0, 8, ref_arr.shape)).astype(np.int16)
    ref = sitk.GetImageFromArray(ref_arr)
    ref.SetSpacing((3.0, 3.0, 3.0))
    ref_l = sitk.GetImageFromArray(ref_lab)
    ref_l.CopyInformation(ref)
    _write_dataset(tmp_path / "ct", "ct_001", ref, ref_l, labels, "CT")
    # the source: an "MR" in LPS on another grid, where fat is bright and muscle dark, as on ../shared/data's MR
    src_arr, src_lab = _body(fat=600, muscle=30, liver=100, air=2)
    src = sitk.GetImageFromArray(src_arr)
    src.SetSpacing((2.5, 2.5, 4.0))
    src.SetOrigin((120.0, 90.0, -30.0))
    src.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    src_l = sitk.GetImageFromArray(src_lab)
    src_l.CopyInformation(src)
    _write_dataset(tmp_path / "mr", "mr_001", src, src_l, labels, "MR")

    assert pc.main([str(tmp_path / "mr"), str(tmp_path / "ct"), str(tmp_path / "out"), "--blur-mm", "0"]) == 0
    out = sitk.ReadImage(str(tmp_path / "out" / "imagesTr" / "mr_001_0000.nii.gz"))
    assert (out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == (src.GetSpacing(), src.GetOrigin(), src.GetDirection())
    a = sitk.GetArrayFromImage(out).astype(float)
    fat = (src_arr == 600) & (src_lab == 0)
    assert abs(np.median(a[src_lab == 1]) - 55) <= 3            # liver: the reference's liver, not the MR's
    assert abs(np.median(a[src_lab == 2]) - 20) <= 3            # muscle
    assert abs(np.median(a[fat]) - -100) <= 5                   # bright MR fat painted as CT fat
    assert abs(np.median(a[:, 10:20, 24:30]) - 20) <= 8          # unlabelled dark tissue as soft tissue
    assert np.median(a[src_arr == 2]) < -950                     # air
    assert 3 < np.std(a[src_lab == 1]) < 20                      # noisy like the reference, not flat
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"] == labels
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "labelsTr" / "mr_001.nii.gz"))), src_lab)

    # a CT source (fat darker than muscle) is split the other way round, its gas not taken for a tissue class
    assert pc.main([str(tmp_path / "ct"), str(tmp_path / "ct"), str(tmp_path / "out-ct"), "--blur-mm", "0"]) == 0
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out-ct" / "imagesTr" / "ct_001_0000.nii.gz"))).astype(float)
    ref_fat = (np.abs(ref_arr + 100) < 40) & (ref_lab == 0)
    assert abs(np.median(b[ref_fat]) - -100) <= 5 and abs(np.median(b[:, 10:20, 24:30]) - 20) <= 8


def test_a_transformed_copy_says_so_in_its_description(tmp_path, monkeypatch):
    """evaluate repeats a dataset's description in its report and the model card: a resampled copy must not
    still call itself the scan as acquired."""
    dc = _load("dataset_copy")
    img, lab = _image()
    _write_dataset(tmp_path / "src", "c_001", img, lab, {"background": 0, "liver": 1}, "CT")
    meta = json.loads((tmp_path / "src" / "dataset.json").read_text())
    (tmp_path / "src" / "dataset.json").write_text(json.dumps({**meta, "description": "One real CT at 3 mm"}))
    monkeypatch.setattr("sys.argv", ["scripts/resample_dataset.py", "src", "out dir", "--spacing", "1", "1", "5"])
    dc.copy_dataset(tmp_path / "src", tmp_path / "out", lambda image, label: image)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["description"] == ("One real CT at 3 mm. This copy was made by `python scripts/resample_dataset.py src "
                                   "'out dir' --spacing 1 1 5`: not the scan as acquired")
    assert meta["labels"] == {"background": 0, "liver": 1} and (tmp_path / "out" / "labelsTr" / "c_001.nii.gz").is_file()

def test_consensus_rules_fuse_agreeing_proposals_and_reject_outliers():
    cr = _load("compare_consensus_rules")
    truth = np.zeros((12, 20, 20), bool)
    truth[3:9, 5:13, 5:13] = True
    masks = np.stack([np.roll(truth, s, axis=2) for s in (0, 0, 1, -1, 0)]             # five near the truth
                     + [np.roll(truth, 9, axis=1) & ~truth for _ in range(3)])          # three elsewhere
    sp = (1.0, 1.0, 1.0)
    for rules in (cr.RULES, cr.grid_rules()):
        for name, fuse in rules.items():
            five = masks[:5]
            fused = fuse(five, sp, rank(five).agreement)
            assert fused.shape == truth.shape and fused.dtype == bool, name
            assert cr.dice(fused, truth) > 0.9, name
            # with the outliers too: the vote-based rules hold; averaged distances are pulled towards
            # the outliers (shape-based averaging's known weakness, and what it did on the real scans)
            if name != "shape-based averaging":
                assert cr.dice(fuse(masks, sp, rank(masks).agreement), truth) > 0.9, name
    assert len(cr.grid_rules()) == 16
    assert cr.dice(cr.shape_average(masks, sp), truth) < 0.5
    # SIMPLE drops the three outliers, so it returns the majority of the five agreeing proposals
    assert np.array_equal(cr.simple(masks, sp), cr.consensus(masks[:5]))
    assert not cr.staple_in_box(np.zeros_like(masks), sp).any()


def test_consensus_rules_score_saved_proposals_without_a_model(tmp_path, capsys):
    cr = _load("compare_consensus_rules")
    truth = np.zeros((6, 8, 8), bool)
    truth[1:5, 2:6, 2:6] = True
    masks = np.stack([truth, truth, np.roll(truth, 1, axis=2), truth])
    folder = tmp_path / "seed7" / "ct-abdomen" / "tsct_001"
    folder.mkdir(parents=True)
    np.savez_compressed(folder / "liver.npz", masks=masks, reference=truth, slab=np.ones_like(truth),
                        spacing=np.array([1.0, 1.0, 1.0]), agreement=rank(masks).agreement)
    assert cr.main(["--from-proposals", str(tmp_path), "--vote-grid"]) == 0
    out = capsys.readouterr().out
    assert "## seed 7: ct-abdomen (tsct_001)" in out and "| liver | 0.875 | 1.000 |" in out
    assert "| keep 1/4, add 3/4 | +0.000 | 0 of 1 | +0.000 |" in out
    # a folder with nothing saved in it: a one-line error, not an empty table
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        cr.main(["--from-proposals", str(tmp_path / "empty")])
    assert "nothing to score" in capsys.readouterr().err


def test_consensus_agreement_gate_uses_the_ranked_first_below_the_threshold(tmp_path):
    cg = _load("consensus_agreement_gate")
    cases = [{"agreement": a, "ranked_first": {"dice": rf}, "consensus": {"dice": c}}
             for a, rf, c in [(0.3, 0.40, 0.20), (0.7, 0.80, 0.90), (0.9, 0.85, 0.84)]]
    (tmp_path / "slab").mkdir()
    (tmp_path / "slab" / "report.json").write_text(json.dumps({"cases": cases}), encoding="utf-8")
    rows = cg.case_rows(tmp_path)
    assert len(rows) == 3
    vote = cg.gate(rows, 0.0)
    assert vote["below"] == 2 and abs(vote["worst"] + 0.20) < 1e-9 and vote["fallbacks"] == 0
    gated = cg.gate(rows, 0.6)  # the first pair falls back to its ranked-first proposal
    assert gated["below"] == 1 and abs(gated["worst"] + 0.01) < 1e-9 and gated["fallbacks"] == 1
    assert abs(gated["mean"] - (0.0 + 0.10 - 0.01) / 3) < 1e-9


def test_petct_dataset_is_built_from_a_totalsegmentator_source_archive(tmp_path):
    """scripts/make_petct_dataset.py on a stand-in for TotalSegmentator's source archive (a DICOM series, a
    label map stored in another axis order, map_to_binary.py): a dataset that evaluate reads, the scan's
    HU and world geometry kept, the label on its grid once reoriented, the names of the "total" classes."""
    import tarfile

    from conftest import write_dicom_series
    from progidiff.datasets import read_dataset, read_label
    from progidiff.errors import InputError
    from progidiff.volume import read_scan

    mp = _load("make_petct_dataset")
    img, lab = _image(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    src = tmp_path / "totalsegmentator-9.9" / "tests" / "reference_files"
    write_dicom_series(img, src / "example_ct_dicom")
    lab = sitk.Flip(lab * 5, [False, True, False])        # the liver's value, stored with y reversed as the real file is
    sitk.WriteImage(lab, str(src / "example_seg_dicom.nii.gz"))
    code = tmp_path / "totalsegmentator-9.9" / "totalsegmentator"
    code.mkdir()
    (code / "map_to_binary.py").write_text('import x\nclass_map = {\n  "other": {1: "a"},\n  "total": {1: "spleen", 5: "liver"},\n}\n')
    (tmp_path / "totalsegmentator-9.9" / "LICENSE").write_text("Apache License")
    sdist = tmp_path / "ts.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "totalsegmentator-9.9", arcname="totalsegmentator-9.9")
    with pytest.raises(InputError, match="sha256"):
        mp.build(sdist, tmp_path / "refused")
    out = mp.build(sdist, tmp_path / "ds", check_hash=False)
    info = read_dataset(out)
    assert info.labels == {"background": 0, "spleen": 1, "liver": 5} and info.modality == "CT"
    assert [c.name for c in info.cases] == [mp.CASE]
    scan = read_scan(info.cases[0].image)
    assert np.array_equal(sitk.GetArrayFromImage(scan.image), sitk.GetArrayFromImage(img))
    assert np.allclose(scan.image.GetOrigin(), img.GetOrigin()) and np.allclose(scan.image.GetSpacing(), img.GetSpacing())
    label = sitk.GetArrayFromImage(read_label(info.cases[0], scan.image, info.labels))
    assert np.array_equal(label == 5, sitk.GetArrayFromImage(img) > 0)
    assert (out / "LICENSE-TotalSegmentator.txt").read_text() == "Apache License"
    with pytest.raises(InputError, match="not empty"):
        mp.build(sdist, out, check_hash=False)
    # an archive without the scan: refused in one line, and nothing half-made left behind
    bare = tmp_path / "bare.tar.gz"
    with tarfile.open(bare, "w:gz") as tar:
        tar.add(code, arcname="totalsegmentator-9.9/totalsegmentator")
    with pytest.raises(InputError, match="example_ct_dicom"):
        mp.build(bare, tmp_path / "bare", check_hash=False)
    assert not (tmp_path / "bare").exists() and not list(tmp_path.glob(".bare.tmp-*"))


def test_judge_candidate_applies_the_four_criteria(tmp_path, capsys):
    """scripts/judge_candidate.py: a candidate that gains the fatty livers and loses nothing passes; one
    that drops a liver met before under 0.85 fails criterion 1 alone; a missing report is one line."""
    jc = _load("judge_candidate")

    def write(root: Path, name: str, dice: dict[str, float]) -> None:
        d = root / jc.SHIPPED_DIR.get(name, name) if root.name == "shipped" else root / name
        d.mkdir(parents=True, exist_ok=True)
        organs = {o: {"ranked_first": {"dice": v, "hd95": 1.0}} for o, v in dice.items()}
        (d / "report.json").write_text(json.dumps({"organs": organs}), encoding="utf-8")

    base = {"liver": 0.86, "spleen": 0.80, "kidney_left": 0.80, "kidney_right": 0.80, "stomach": 0.70}
    shipped, good, bad = tmp_path / "shipped", tmp_path / "good", tmp_path / "bad"
    for name in jc.PRESENTATIONS:
        write(shipped, name, {**base, "liver": 0.80} if name in jc.FATTY else base)
        write(good, name, {**base, "liver": 0.84} if name in jc.FATTY else base)
        write(bad, name, {**base, "liver": 0.84} if name in jc.FATTY else
              {**base, "liver": 0.849} if name == "ct-body-fat" else base)
    assert jc.main([str(good), "--shipped-dir", str(shipped), "--name", "good"]) == 0
    out = capsys.readouterr().out
    assert "good passes all four criteria" in out and "**fails**" not in out
    assert jc.main([str(bad), "--shipped-dir", str(shipped), "--name", "bad"]) == 0
    out = capsys.readouterr().out
    assert "bad fails" in out and out.count("**fails**") == 1 and "ct-body-fat liver 0.860 → 0.849" in out
    (bad / "ct-body-x1.45" / "report.json").unlink()
    assert jc.main([str(bad), "--shipped-dir", str(shipped)]) == 2
    err = capsys.readouterr().err
    assert "ct-body-x1.45" in err and len(err.strip().splitlines()) == 1


def test_set_structure_density_paints_the_mask_with_the_scan_s_own_noise_and_nothing_else(tmp_path, capsys):
    """An "enhanced heart" at 400 HU beside a noisy "liver" at 60 HU, on an oblique LPS grid with the masks
    on a cropped grid of their own: the heart reads the asked HU with noise of the liver's spread and next-
    voxel correlation; voxels 3 mm from it keep their value; the geometry is kept; a mask outside the scan
    and a noise region too small are one-line errors with nothing written."""
    sd = _load("set_structure_density")
    rng = np.random.default_rng(1)
    from scipy import ndimage
    noise = ndimage.gaussian_filter(rng.standard_normal((40, 40, 48)), 0.8)
    arr = np.full((40, 40, 48), -1000.0)
    arr[5:35, 5:35, 4:22] = 60 + noise[5:35, 5:35, 4:22] * 25 / noise.std()     # "liver"
    arr[5:35, 5:35, 26:44] = 400                                                # "heart", flat bright blood
    img = sitk.GetImageFromArray(np.round(arr).astype(np.int16))
    img.SetSpacing((1.5, 1.5, 2.0))
    img.SetOrigin((30.0, -12.0, 400.0))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    liver, heart = np.zeros(arr.shape, np.uint8), np.zeros(arr.shape, np.uint8)
    liver[5:35, 5:35, 4:22], heart[5:35, 5:35, 26:44] = 1, 1
    lv, ht = sitk.GetImageFromArray(liver), sitk.GetImageFromArray(heart)
    lv.CopyInformation(img)
    ht.CopyInformation(img)
    ht = sitk.RegionOfInterest(ht, (22, 36, 36), (24, 2, 2))      # the mask on a crop, as TotalSegmentator's are
    for f, im in (("ct", img), ("liver", lv), ("heart", ht)):
        sitk.WriteImage(im, str(tmp_path / f"{f}.nii.gz"))
    out_file = tmp_path / "out" / "unenhanced.nii.gz"
    assert sd.main([str(tmp_path / "ct.nii.gz"), str(out_file), "--hu", "55", "--mask", str(tmp_path / "heart.nii.gz"),
                    "--noise-from", str(tmp_path / "liver.nii.gz")]) == 0
    assert "set to 55 HU" in capsys.readouterr().out
    out = sitk.ReadImage(str(out_file))
    assert out.GetDirection() == img.GetDirection() and out.GetOrigin() == img.GetOrigin() and out.GetSpacing() == img.GetSpacing()
    b = sitk.GetArrayFromImage(out).astype(np.float64)
    # measured > 6 mm inside each block, out of reach of its border's step in the 3 mm high-pass
    liver_inner, heart_inner = np.zeros(arr.shape, bool), np.zeros(arr.shape, bool)
    liver_inner[8:32, 9:31, 8:18], heart_inner[8:32, 9:31, 30:40] = True, True
    (s_liver, r_liver), (s_heart, r_heart) = (sd.noise_measures(x, m, np.array([1.5, 2, 2]))
                                              for x, m in ((arr, liver_inner), (b, heart_inner)))
    assert abs(s_heart - s_liver) < 0.1 * s_liver and abs(r_heart - r_liver) < 0.1
    assert abs(np.median(b[heart_inner]) - 55) < 0.15 * s_liver
    assert abs(b[heart_inner].std() - arr[liver_inner].std()) < 0.2 * arr[liver_inner].std()
    far = np.ones(arr.shape, bool)
    far[3:37, 3:37, 24:46] = False                                # 3 voxels (>= 4.5 mm) from the heart
    assert np.array_equal(b[far], np.round(arr)[far])
    # a mask that lies outside the scan, and a noise region of a few voxels: refused
    away = sitk.Image(ht)
    away.SetOrigin((900.0, 900.0, 900.0))
    sitk.WriteImage(away, str(tmp_path / "away.nii.gz"))
    tiny = sitk.GetImageFromArray((np.arange(liver.size).reshape(liver.shape) < 30).astype(np.uint8))
    tiny.CopyInformation(img)
    sitk.WriteImage(tiny, str(tmp_path / "tiny.nii.gz"))
    for mask, ref, says in (("away", "liver", "no voxel"), ("heart", "tiny", "at least 1000")):
        bad = tmp_path / f"bad-{mask}-{ref}.nii.gz"
        assert sd.main([str(tmp_path / "ct.nii.gz"), str(bad), "--hu", "55", "--mask", str(tmp_path / f"{mask}.nii.gz"),
                        "--noise-from", str(tmp_path / f"{ref}.nii.gz")]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and not bad.exists()


def test_score_review_rule_adds_the_pairs_well_below_the_card_s_usual_agreement_and_the_weak_organs(tmp_path, capsys):
    sr = _load("score_review_rule")
    model = tmp_path / "model"
    model.mkdir()
    card = {"training": {"dataset": "../data/ct-abdomen"},
            "metrics": {"ct-abdomen": {"organs": {"liver": {"agreement": 0.95}, "spleen": {"agreement": 0.92},
                                                  "gallbladder": {"ranked_first_dice": 0.53},
                                                  "stomach": {"ranked_first_dice": 0.72}}}}}
    (model / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    case = lambda organ, agreement, dice: {"case": "c1", "organ": organ, "agreement": agreement,
                                           "ranked_first": {"dice": dice}}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"cases": [case("liver", 0.90, 0.80),    # 0.05 below: added, a target miss
                                            case("liver", 0.94, 0.84),    # within the margin: a silent miss
                                            case("spleen", 0.70, 0.40),   # under the floor: flagged by both
                                            case("spleen", 0.91, 0.90),
                                            case("gallbladder", 0.85, 0.55),   # confident, poor: a rough draft
                                            case("stomach", 0.88, 0.60)]}), encoding="utf-8")   # told nothing
    assert sr.main([str(model), f"scan={report}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "| **target misses** | 3 | 1 | 2 |" in out   # the spleen at 0.40 is one too
    assert "| 0.00–0.50 | 1 | 1 | 1 |" in out and "| 0.70–0.85 | 2 | 0 | 1 |" in out
    assert "| scan | liver | 0.900 | 0.950 | 0.800 | yes | added |" in out
    assert "| scan | liver | 0.940 | 0.950 | 0.840 | yes |  |" in out
    assert not [ln for ln in out if ln.startswith("| scan | spleen")]
    assert "Weak organs (held-out Dice under 0.70 in the card): gallbladder" in out
    assert "| 0.50–0.70 | 2 | 0 | 1 |" in out
    assert out[-2:] == ["Under Dice 0.70 and told neither: 1", "- scan stomach: Dice 0.600, agreement 0.880"]
    assert sr.main([str(model), f"scan={tmp_path / 'missing.json'}"]) == 2


def test_oral_contrast_fills_the_bowel_lumen_and_leaves_its_wall_its_gas_and_the_rest_alone(tmp_path, capsys):
    """A "stomach" of fluid at 30 HU with a gas pocket, beside a "liver": its lumen reads the contrast's HU
    with the scan's grain, its 3 mm wall, its gas and the liver keep their values, the labels are copied
    as they are; an unknown structure and a non-empty output folder are one-line errors."""
    oc = _load("add_oral_contrast")
    rng = np.random.default_rng(0)
    arr = np.full((20, 24, 40), -1000.0)
    arr[2:18, 2:22, 2:18] = 30 + rng.normal(0, 12, (16, 20, 16))        # "stomach": fluid, noisy
    arr[2:18, 2:6, 6:14] = -1000                                       # its gas, against the wall
    arr[2:18, 2:22, 22:38] = 60                                        # "liver"
    lab = np.zeros(arr.shape, np.uint8)
    lab[2:18, 2:22, 2:18], lab[2:18, 2:22, 22:38] = 1, 2
    img, lim = sitk.GetImageFromArray(np.round(arr).astype(np.int16)), sitk.GetImageFromArray(lab)
    img.SetSpacing((3.0, 3.0, 3.0))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    lim.CopyInformation(img)
    _write_dataset(tmp_path / "src", "c1", img, lim, {"background": 0, "stomach": 1, "liver": 2}, "CT")
    assert oc.main([str(tmp_path / "src"), str(tmp_path / "out"), "--structures", "stomach", "--hu", "250"]) == 0
    assert "filled at 250 HU" in capsys.readouterr().out
    out = sitk.ReadImage(str(tmp_path / "out" / "imagesTr" / "c1_0000.nii.gz"))
    b, a = sitk.GetArrayFromImage(out).astype(float), np.round(arr)
    assert out.GetDirection() == img.GetDirection()
    lumen = np.zeros(arr.shape, bool)
    lumen[4:16, 4:20, 4:16] = True                                     # 2 voxels (6 mm) inside the stomach
    fluid = lumen & (a > -400)
    assert abs(np.median(b[fluid]) - 250) < 5 and 5 < (b[fluid] - 250).std() < 20   # bright, and still grainy
    assert b[fluid].max() < 330                                        # no bright rim where the gas begins
    assert np.all(b[a <= -400] == -1000)                               # the gas stays
    wall = (lab == 1) & ~np.pad(np.ones((14, 18, 14), bool), ((3, 3), (3, 3), (3, 23)))
    assert np.abs(b[wall & (a > -400)] - a[wall & (a > -400)]).max() < 10   # the outer 3 mm: soft tissue
    assert np.all(b[lab == 2] == a[lab == 2]) and np.all(b[lab == 0] == a[lab == 0])
    copied = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "labelsTr" / "c1.nii.gz")))
    assert np.array_equal(copied, lab)
    for args, says in (([str(tmp_path / "bad"), "--structures", "stomack"], "stomack"),
                       ([str(tmp_path / "out")], "not empty")):
        assert oc.main([str(tmp_path / "src")] + args) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_liver_lesions_are_darker_balls_inside_the_liver_within_the_z_range_and_the_labels_stay(tmp_path, capsys):
    """Three lesions 50 HU darker in a "liver" block on an LPS grid: each a ball inside the liver with its
    centre in the asked world z range, nothing outside the liver moves, the labels are copied as they are;
    lesions too large for the liver are a one-line error with nothing written."""
    ll = _load("add_liver_lesions")
    from scipy import ndimage
    rng = np.random.default_rng(0)
    arr = np.full((30, 30, 40), -1000.0)
    arr[2:28, 3:27, 2:30] = 100 + rng.normal(0, 10, (26, 24, 28))        # "liver", portal-venous
    arr[2:28, 3:27, 32:38] = 60                                          # "kidney"
    lab = np.zeros(arr.shape, np.uint8)
    lab[2:28, 3:27, 2:30], lab[2:28, 3:27, 32:38] = 1, 2
    img, lim = sitk.GetImageFromArray(np.round(arr).astype(np.int16)), sitk.GetImageFromArray(lab)
    img.SetSpacing((2.0, 2.0, 3.0))
    img.SetOrigin((10.0, 20.0, 300.0))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    lim.CopyInformation(img)
    _write_dataset(tmp_path / "src", "c1", img, lim, {"background": 0, "liver": 1, "kidney_left": 2}, "CT")
    assert ll.main([str(tmp_path / "src"), str(tmp_path / "out"), "--count", "3", "--diameter-mm", "8", "12",
                    "--z-mm", "330", "360", "--blur-mm", "0"]) == 0
    assert "3 lesions" in capsys.readouterr().out
    b, a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "imagesTr" / "c1_0000.nii.gz"))).astype(float), np.round(arr)
    moved = b != a
    assert np.all(b[moved] - a[moved] == -50) and np.all(lab[moved] == 1)          # inside the liver only
    parts, n = ndimage.label(moved)
    assert n == 3
    for k in range(1, n + 1):
        zz, yy, xx = np.nonzero(parts == k)
        extent = [(v.max() - v.min() + 1) * s for v, s in ((zz, 3.0), (yy, 2.0), (xx, 2.0))]
        assert all(4 <= e <= 14 for e in extent)                                       # balls of 8-12 mm
        z_world = 300.0 + zz.mean() * 3.0
        assert 330 - 3 <= z_world <= 360 + 3
    copied = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "labelsTr" / "c1.nii.gz")))
    assert np.array_equal(copied, lab)
    assert ll.main([str(tmp_path / "src"), str(tmp_path / "bad"), "--diameter-mm", "60", "70"]) == 2
    err = capsys.readouterr().err
    assert "no room" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1)])
def test_slice_picture_shows_the_patient_s_right_on_the_left_and_the_front_up(tmp_path, direction, capsys):
    """A block on the patient's right and front, stored LPS or RAS: in the picture's array it lies in the
    left columns and the top rows either way; the picture is written; an unknown label is a one-line error."""
    ps = _load("plot_dataset_slices")
    img, _ = _image(direction)
    xy = np.array([[img.TransformIndexToPhysicalPoint((i, j, 15))[:2] for i in range(24)] for j in range(20)])
    mid = (xy.min((0, 1)) + xy.max((0, 1))) / 2
    # LPS: the patient's right has the smaller x, the front the smaller y
    arr = np.full((30, 20, 24), -1000, np.int16)
    arr[10:20][:, (xy[..., 0] < mid[0] - 6) & (xy[..., 1] < mid[1] - 6)] = 60
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((3.0, 3.0, 3.0))
    img.SetOrigin((40.0, -20.0, 100.0))
    img.SetDirection(direction)
    out = ps.axial_slice(img, 145.0)
    rows, cols = np.nonzero(out > 0)
    assert rows.size and rows.max() < out.shape[0] / 2 and cols.max() < out.shape[1] / 2
    lab = sitk.GetImageFromArray((arr > 0).astype(np.uint8))
    lab.CopyInformation(img)
    _write_dataset(tmp_path / "d", "c1", img, lab, {"background": 0, "stomach": 1}, "CT")
    png = tmp_path / "pic" / "slices.png"
    assert ps.main(["--z-mm", "145", "--labels", "stomach", "-o", str(png), f"a={tmp_path / 'd'}", f"b={tmp_path / 'd'}"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sitk.WriteImage(lab, str(tmp_path / "proposal.nii.gz"))
    assert ps.main([f"a={tmp_path / 'd'}", f"b={tmp_path / 'd'}", "--z-mm", "145", "-o", str(png),
                    "--masks", f"2:proposal={tmp_path / 'proposal.nii.gz'}"]) == 0
    assert ps.main([f"a={tmp_path / 'd'}", "--z-mm", "145", "-o", str(tmp_path / "bad.png"), "--masks", "proposal"]) == 2
    assert "NAME=FILE" in capsys.readouterr().err
    assert ps.main(["--z-mm", "145", "--labels", "stomack", "-o", str(tmp_path / "bad.png"), f"a={tmp_path / 'd'}"]) == 2
    err = capsys.readouterr().err
    assert "stomack" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad.png").exists()
