"""Geometry and input handling on real scans and synthetic edge cases."""
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from progidiff.errors import InputError
from progidiff.volume import (GridSpec, context_slices, from_model_grid, guess_modality, label_to_model_grid,
                              model_grid, on_model_grid, read_scan, stored_without_intercept, to_model_grid)

GRID = GridSpec((6.0, 6.0, 5.0), (64, 64))


def reoriented(image: sitk.Image, order: str) -> sitk.Image:
    """The same scan stored with another axis order / orientation (voxels and world unchanged)."""
    return sitk.DICOMOrient(image, order)


@pytest.mark.parametrize("order", ["LPS", "RAS", "LAS", "SAR", "PIL"])
def test_model_input_is_the_same_whatever_the_storage_orientation(ct_path, order):
    img = sitk.ReadImage(str(ct_path), sitk.sitkFloat32)
    ref_a = model_grid(img, GRID, "CT")
    a = to_model_grid(img, ref_a, "CT")
    other = reoriented(img, order)
    ref_b = model_grid(other, GRID, "CT")
    b = to_model_grid(other, ref_b, "CT")
    assert ref_a.GetOrigin() == pytest.approx(ref_b.GetOrigin(), abs=1e-4)
    assert ref_a.GetSize() == ref_b.GetSize()
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_mask_round_trip_to_input_grid_keeps_the_organ(ct_label_path):
    lab = sitk.ReadImage(str(ct_label_path))
    liver = sitk.Cast(lab == 5, sitk.sitkUInt8)
    for order in ("RAS", "LPS", "PIL"):
        src = reoriented(liver, order)
        ref = model_grid(sitk.Cast(src, sitk.sitkFloat32) * 1000 - 1000, GRID, "CT")
        on_grid = label_to_model_grid(src, ref).astype(np.float32)
        back = from_model_grid(on_grid, ref, src)
        truth = sitk.GetArrayFromImage(src) > 0
        d = 2 * (back & truth).sum() / (back.sum() + truth.sum())
        assert back.shape == truth.shape
        assert d > 0.9, (order, d)  # 6 mm grid and back: only partial-volume losses at the border


def test_oblique_scan_round_trip():
    """A synthetic ball in an oblique (rotated) volume comes back on the same voxels."""
    img = sitk.Image(60, 60, 40, sitk.sitkFloat32)
    img.SetSpacing((2.0, 2.0, 3.0))
    rot = sitk.VersorTransform((0.3, 0.2, 1.0), 0.5)
    img.SetDirection(rot.GetMatrix())
    img.SetOrigin((10.0, -20.0, 5.0))
    idx = np.indices((40, 60, 60)).astype(float)
    ball = ((idx[0] - 20) * 3) ** 2 + ((idx[1] - 30) * 2) ** 2 + ((idx[2] - 30) * 2) ** 2 < 30 ** 2
    mask = sitk.GetImageFromArray(ball.astype(np.uint8))
    mask.CopyInformation(img)
    arr = np.where(ball, 40.0, -1000.0).astype(np.float32)
    ct = sitk.GetImageFromArray(arr)
    ct.CopyInformation(img)
    ref = model_grid(ct, GridSpec((3.0, 3.0, 3.0), (64, 64)), "CT")
    back = from_model_grid(label_to_model_grid(mask, ref).astype(np.float32), ref, mask)
    d = 2 * (back & ball).sum() / (back.sum() + ball.sum())
    assert d > 0.95


@settings(max_examples=25, deadline=None)
@given(
    size=st.tuples(st.integers(16, 40), st.integers(16, 40), st.integers(4, 30)),
    spacing=st.tuples(st.floats(0.5, 4.0), st.floats(0.5, 4.0), st.floats(0.5, 6.0)),
    axes=st.permutations([0, 1, 2]),
    flips=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_model_grid_covers_any_axis_aligned_volume(size, spacing, axes, flips):
    """Property: for random shapes, spacings, permutations and flips, the model grid spans
    the scan's superior-inferior extent and a block comes back onto the input grid."""
    d = np.zeros((3, 3))
    for i, a in enumerate(axes):
        d[a, i] = -1.0 if flips[i] else 1.0
    img = sitk.Image(list(size), sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetDirection(d.ravel().tolist())
    arr = np.full(size[::-1], -1000.0, np.float32)
    arr[1:-1, 2:-2, 2:-2] = 50.0
    ct = sitk.GetImageFromArray(arr)
    ct.CopyInformation(img)
    grid = GridSpec((2.0, 2.0, 2.0), (96, 96))
    ref = model_grid(ct, grid, "CT")
    vol = to_model_grid(ct, ref, "CT")
    assert vol.shape[1:] == (96, 96) and vol.min() >= 0 and vol.max() <= 1
    back = from_model_grid(np.ones(vol.shape, np.float32), ref, ct)
    # every voxel centre inside the grid's slab maps back to the input grid
    assert back.shape == arr.shape
    assert back.mean() > 0.5


def test_context_slices_repeat_edges():
    v = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    c = context_slices(v, 1)
    assert c.shape == (5, 3, 2, 2)
    assert c[0, :, 0, 0].tolist() == [0, 0, 1] and c[4, :, 0, 0].tolist() == [3, 4, 4]


def test_modality_guess(ct_path, mr_path):
    assert guess_modality(read_scan(ct_path))[0] == "CT"
    assert guess_modality(read_scan(mr_path))[0] == "MR"


def _stored(image: sitk.Image) -> sitk.Image:
    """The CT as a converter that drops the rescale intercept writes it: HU + 1024, unsigned."""
    arr = np.clip(sitk.GetArrayFromImage(image).astype(np.float32) + 1024, 0, None).astype(np.uint16)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def test_a_ct_stored_without_its_rescale_intercept_is_read_in_hounsfield_units(tmp_path, ct_path, mr_path):
    """Given --modality CT, it reaches the model as the scan in HU does; left to the heuristic it is
    taken for MR (it could be one), with a warning that says what to pass."""
    hu = read_scan(ct_path)
    stored = read_scan(_write(tmp_path, sitk.GetArrayFromImage(_stored(hu.image))))
    stored.image.CopyInformation(hu.image)
    assert stored_without_intercept(stored.image)
    ref, vol = on_model_grid(hu.image, GRID, "CT")
    stored_ref, stored_vol = on_model_grid(stored.image, GRID, "CT")
    assert np.array_equal(sitk.GetArrayViewFromImage(stored_ref), sitk.GetArrayViewFromImage(ref))
    assert ref.GetOrigin() == stored_ref.GetOrigin()
    # within 5 HU: the few voxels below -1024 HU, clipped at 0 when stored unsigned, blur into their neighbours
    np.testing.assert_allclose(stored_vol, vol, atol=0.01)
    modality, reason = guess_modality(stored)
    assert modality == "MR" and "--modality CT" in reason
    # nothing else is shifted: a scan in HU, an MR, a HU scan clipped at 0 (no air, bone only above 800)
    clipped = sitk.Clamp(hu.image, lowerBound=0.0)
    for image in (hu.image, read_scan(mr_path).image, clipped):
        assert not stored_without_intercept(image)
    assert "--modality CT" not in guess_modality(read_scan(mr_path))[1]


def _write(tmp_path, arr, name="img.nii.gz", spacing=(1.0, 1.0, 1.0), vector=False):
    img = sitk.GetImageFromArray(arr, isVector=vector)
    if img.GetDimension() == 3 or vector:
        img.SetSpacing(spacing[: img.GetDimension()])
    p = tmp_path / name
    sitk.WriteImage(img, str(p))
    return p


def test_bad_inputs_give_one_line_errors(tmp_path, ct_path):
    cases = {
        "missing": tmp_path / "nope.nii.gz",
        "2d": _write(tmp_path, np.zeros((64, 64), np.float32), "2d.nii.gz"),
        "4d": None,
        "rgb": _write(tmp_path, np.zeros((20, 32, 32, 3), np.uint8), "rgb.nrrd", vector=True),
        "constant": _write(tmp_path, np.full((20, 32, 32), 7, np.int16), "const.nii.gz"),
        "truncated": tmp_path / "trunc.nii.gz",
        "single_slice": _write(tmp_path, np.random.rand(1, 64, 64).astype(np.float32), "slice.nii.gz"),
    }
    four = sitk.JoinSeries([sitk.GetImageFromArray(np.random.rand(8, 20, 20).astype(np.float32))] * 3)
    sitk.WriteImage(four, str(tmp_path / "4d.nii.gz"))
    cases["4d"] = tmp_path / "4d.nii.gz"
    data = ct_path.read_bytes()
    cases["truncated"].write_bytes(data[: len(data) // 3])
    for name, p in cases.items():
        with pytest.raises(InputError) as e:
            read_scan(p)
        assert "\n" not in str(e.value), name
        assert str(p.name) in str(e.value) or name == "missing", name


def test_nan_voxels_are_replaced(tmp_path):
    arr = np.random.rand(20, 32, 32).astype(np.float32) * 100
    arr[3, 4, 5] = np.nan
    arr[4, 4, 5] = np.inf
    scan = read_scan(_write(tmp_path, arr))
    assert np.isfinite(sitk.GetArrayViewFromImage(scan.image)).all()


def test_extreme_spacing_is_refused(tmp_path):
    p = _write(tmp_path, np.random.rand(20, 32, 32).astype(np.float32), spacing=(1.0, 1.0, 50.0))
    with pytest.raises(InputError, match="spacing"):
        read_scan(p)


def _noisy_block(spacing: tuple[float, float, float], noise_hu: float, seed: int = 0) -> sitk.Image:
    """A 60 HU block (a liver's density) in -1000 HU air, 288 x 288 x 150 mm, white noise added."""
    size = [int(round(e / s)) for e, s in zip((288.0, 288.0, 150.0), spacing)]
    arr = np.full(size[::-1], -1000.0, np.float32)
    z, y, x = (np.indices(arr.shape, sparse=True)[i] * spacing[2 - i] for i in range(3))
    arr[(abs(x - 144) < 90) & (abs(y - 144) < 90) & (abs(z - 75) < 60)] = 60.0
    arr += np.random.default_rng(seed).normal(0.0, noise_hu, arr.shape).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img


def _block_noise_on_grid(img: sitk.Image) -> float:
    ref = model_grid(img, GRID, "CT")
    vol = to_model_grid(img, ref, "CT")
    inner = vol[8:-8, 24:40, 24:40]  # well inside the block
    return float(inner.std() * 500)  # back to HU (the CT window is 500 HU wide)


def test_a_thin_slice_scan_reaches_the_grid_with_the_noise_of_a_3mm_one():
    """The same noise per mm³ at 0.8 x 0.8 x 1.5 mm and at 3 mm (20 HU at the fine voxels is
    3.8 HU at 3 mm voxels): linear resampling alone kept the fine scan's noise (about 10 HU on the
    grid, measured before the anti-aliasing blur); blurred to the grid's detail first, it is no
    noisier than the 3 mm scan's."""
    fine = _block_noise_on_grid(_noisy_block((0.8, 0.8, 1.5), 20.0))
    coarse = _block_noise_on_grid(_noisy_block((3.0, 3.0, 3.0), 20.0 * np.sqrt(0.8 * 0.8 * 1.5 / 27)))
    assert fine <= coarse * 1.25, (fine, coarse)


def test_scans_as_coarse_as_the_training_ones_are_not_blurred(ct_path):
    """The 3 mm scans (the shipped model's training data) reach the grid by linear resampling alone,
    as they did when it was trained."""
    from progidiff.volume import antialias, antialias_sigma

    img = sitk.ReadImage(str(ct_path))
    ref = model_grid(img, GRID, "CT")
    assert not antialias_sigma(img, ref).any()
    for spacing, blurred in (((2.0, 2.0, 1.7), False), ((1.9, 1.9, 3.0), True), ((3.0, 3.0, 1.6), True)):
        phantom = _noisy_block(spacing, 0.0)
        assert (antialias(phantom, model_grid(phantom, GRID, "CT")) is not phantom) == blurred, spacing
    plain = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    np.testing.assert_array_equal(to_model_grid(img, ref, "CT"), np.clip((plain + 200) / 500, 0, 1).astype(np.float32))


def _oblique_target() -> sitk.Image:
    """A scan grid finer than the model's, rotated 20 degrees about z and stored with flipped axes."""
    import math

    t = sitk.Image(70, 60, 30, sitk.sitkInt16)
    t.SetSpacing((1.1, 0.9, 2.5))
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    t.SetDirection((-c, s, 0, s, c, 0, 0, 0, -1))
    t.SetOrigin((30.0, -60.0, 40.0))
    return t


@pytest.mark.parametrize("where", ["inside", "on the grid's edge", "outside the scan", "nowhere"])
def test_resampling_only_the_organ_box_gives_the_whole_grid_voxels(where):
    """The box the engine resamples holds every voxel that resampling the whole scan grid gives,
    on an oblique, flipped grid; outside it nothing."""
    from progidiff.volume import masks_from_model_grid

    ref = sitk.Image(24, 20, 14, sitk.sitkFloat32)
    ref.SetSpacing((3.0, 3.0, 4.0))
    ref.SetOrigin((-40.0, -60.0, -20.0))
    rng = np.random.default_rng(0)
    probs = np.zeros((3, 14, 20, 24), np.float32)
    region = {"inside": np.s_[:, 5:9, 8:13, 9:15], "on the grid's edge": np.s_[:, 0:4, 0:6, 18:24],
              "outside the scan": np.s_[:, 0:3, 0:3, 0:3], "nowhere": np.s_[:, 0:0]}[where]
    probs[region] = rng.uniform(0, 1, probs[region].shape)
    target = _oblique_target()
    block, box = masks_from_model_grid(probs, ref, target)
    for n in range(3):
        whole = from_model_grid(probs[n], ref, target)
        inside = np.zeros_like(whole)
        inside[box] = block[n]
        np.testing.assert_array_equal(inside, whole)
    if where == "inside":
        assert block.any() and 0 < block[0].size < 0.5 * np.prod(target.GetSize())
    if where in ("outside the scan", "nowhere"):
        assert block.size == 0


def test_a_label_map_given_as_the_scan_is_refused(tmp_path, ct_label_path, ct_path):
    """labelsTr/ for imagesTr/ (or a segmentation picked as Slicer's input): the model would segment it."""
    with pytest.raises(InputError, match=r"looks like a label map \(62 distinct whole values from 0 to 117\)"):
        read_scan(ct_label_path)
    binary = (np.random.default_rng(0).random((20, 32, 32)) > 0.5).astype(np.uint8)
    with pytest.raises(InputError, match="label map"):
        read_scan(_write(tmp_path, binary))
    read_scan(ct_path)   # the scan the labels were drawn on is read
    # an 8-bit image of whole numbers from 0 with the many values of a scan is a scan
    eight_bit = np.random.default_rng(1).integers(0, 256, (20, 32, 32)).astype(np.uint8)
    assert read_scan(_write(tmp_path, eight_bit, name="u8.nii.gz")).image.GetSize() == (32, 32, 20)
