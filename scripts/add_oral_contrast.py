#!/usr/bin/env python3
"""Copy an nnU-Net-style CT dataset with positive oral contrast in the bowel, made from its own labels:
many abdominal CT protocols have the patient drink a dilute iodine or barium contrast an hour before,
which fills the stomach, duodenum and small bowel at 150-400 HU, where ../shared/data/ct-abdomen's
stomach holds fluid at 34 HU (median). Inside each named structure, deeper than --wall-mm (the
wall, which stays soft tissue), every voxel that is not gas (under -400 HU: gas floats on the
contrast and stays) is set to --hu, keeping the scan's own grain there (each voxel's departure from
the 3 mm blur of those voxels). The change is blurred by --blur-mm at its border (partial volume). Labels and
everything else are copied unchanged.

example:
  python scripts/add_oral_contrast.py ../shared/data/ct-abdomen /tmp/ct-oral-contrast
  python scripts/add_oral_contrast.py ../shared/data/ct-abdomen /tmp/ct-oral-contrast-colon --structures stomach duodenum small_bowel colon
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset_copy import case_files, copy_dataset_json, copy_parser, open_copy  # noqa: E402

#: The upper gastrointestinal tract, which oral contrast given an hour before the scan fills first.
UPPER_GI = ("stomach", "duodenum", "small_bowel")
#: Gas reads about -1000 HU; partial volume with the wall or the contrast lifts it, but not to here.
GAS_HU = -400.0
#: The blur whose residual is the scan's grain (as in set_structure_density.py).
GRAIN_MM = 3.0


def lumen(label: np.ndarray, values: list[int], spacing_zyx: np.ndarray, wall_mm: float) -> np.ndarray:
    """The voxels of the structures ``values`` farther than ``wall_mm`` from their border, each
    structure measured on its own (two touching loops keep their walls)."""
    out = np.zeros(label.shape, bool)
    for v in values:
        m = label == v
        if m.any():
            out |= ndimage.distance_transform_edt(m, sampling=spacing_zyx) > wall_mm
    return out


def fill(image: sitk.Image, label: sitk.Image, values: list[int], hu: float, wall_mm: float,
         blur_mm: float) -> tuple[sitk.Image, float]:
    """``image`` with the non-gas lumen of the structures ``values`` at ``hu`` plus the scan's grain,
    and the volume filled (ml)."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    lab = sitk.GetArrayFromImage(sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    spacing = np.asarray(image.GetSpacing()[::-1], float)              # z, y, x as the array is
    filled = lumen(lab, values, spacing, wall_mm) & (arr > GAS_HU)
    # the grain about the blur of the filled voxels alone (a normalised convolution): a plain blur
    # would carry the step to the gas or the fat beyond the wall into the grain, a rim of 500 HU
    sigma = GRAIN_MM / spacing
    share = ndimage.gaussian_filter(filled.astype(np.float32), sigma)
    local = ndimage.gaussian_filter(np.where(filled, arr, 0), sigma) / np.maximum(share, 1e-6)
    grain = np.where(filled, arr - local, 0)
    weight = filled.astype(np.float32)
    if blur_mm > 0:
        weight = ndimage.gaussian_filter(weight, blur_mm / spacing)
        weight[arr <= GAS_HU] = 0.0            # the gas stays gas at the fluid level
    out = (1 - weight) * arr + weight * (hu + grain)
    res = sitk.GetImageFromArray(np.round(out).astype(np.int16))
    res.CopyInformation(image)
    return res, float(filled.sum() * np.prod(spacing) / 1000)


def main(argv: list[str] | None = None) -> int:
    p = copy_parser(__doc__)
    p.add_argument("--hu", type=float, default=250.0, help="the contrast's density (HU; default 250)")
    p.add_argument("--structures", nargs="+",
                   help=f"labels whose lumen is filled (default: those of {' '.join(UPPER_GI)} the dataset has)")
    p.add_argument("--wall-mm", type=float, default=3.0, help="the wall left as it is (mm; default 3)")
    p.add_argument("--blur-mm", type=float, default=1.0, help="Gaussian sigma of the change at its border (mm)")
    a = p.parse_args(argv)
    if (opened := open_copy(a, "add_oral_contrast")) is None:
        return 2
    src, dst, names = opened
    structures = a.structures or [s for s in UPPER_GI if s in names]
    unknown = sorted(set(structures) - set(names))
    if unknown or not structures:
        print(f"add_oral_contrast: no such label in {src}: {', '.join(unknown or UPPER_GI)}", file=sys.stderr)
        return 2
    values = [names[s] for s in structures]
    (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dst / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case, im, lf in case_files(src):
        out, ml = fill(sitk.ReadImage(str(im)), sitk.ReadImage(str(lf)), values, a.hu, a.wall_mm, a.blur_mm)
        sitk.WriteImage(out, str(dst / "imagesTr" / im.name))
        shutil.copy(lf, dst / "labelsTr" / lf.name)
        print(f"{case}: {ml:.0f} ml of {', '.join(structures)} filled at {a.hu:g} HU")
    copy_dataset_json(src, dst)
    print(f"dataset with oral contrast written to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
