"""The dataset helpers behind the robustness evaluations (scripts/crop_dataset_fov.py,
scripts/resample_dataset.py): the world geometry must survive, or a held-out slab would move."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import SimpleITK as sitk

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
