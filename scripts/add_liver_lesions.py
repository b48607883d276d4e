#!/usr/bin/env python3
"""Copy an nnU-Net-style CT dataset with round focal lesions in an organ, made from its own labels:
liver metastases are the commonest finding of oncological abdominal CT, and on a portal-venous scan
they read 30-70 HU below the liver around them (--hu -50). Each lesion is a ball of a random diameter
in --diameter-mm, centred on a random voxel of the organ (within --z-mm of world z, if given) at least
its radius from the organ's border, kept inside the organ; inside it every voxel is moved by --hu,
keeping the scan's grain, with a soft border (--blur-mm). The labels are copied unchanged: a lesion is
part of the organ it lies in, as reference liver masks (and a radiologist's liver volume) count it.

example:
  python scripts/add_liver_lesions.py /tmp/ct-portal-venous /tmp/ct-liver-lesions --z-mm 330 362 --count 5
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


def place(organ: np.ndarray, spacing_zyx: np.ndarray, z_mm: np.ndarray, count: int,
          diameters: tuple[float, float], z_range: tuple[float, float] | None,
          rng: np.random.Generator) -> list[tuple[np.ndarray, float]]:
    """``count`` lesion centres (voxel z, y, x) and diameters (mm): each centre a voxel of ``organ`` at
    least the lesion's radius from its border (so the ball lies inside it), with world z (``z_mm``
    of each array slice, an axial scan's) inside ``z_range``; no two lesions overlap."""
    depth = ndimage.distance_transform_edt(organ, sampling=spacing_zyx)
    if z_range is not None:
        depth[(z_mm < z_range[0]) | (z_mm > z_range[1])] = 0
    out: list[tuple[np.ndarray, float]] = []
    apart: list[np.ndarray] = []                                        # each placed lesion's distance map (mm)
    for d in np.sort(rng.uniform(*diameters, count))[::-1]:           # the largest first, while there is room
        room = depth >= d / 2
        for (_, e), dist in zip(out, apart):                            # no overlap with those placed
            room &= dist > (d + e) / 2
        idx = np.flatnonzero(room)
        if idx.size == 0:
            raise ValueError(f"no room for a {d:.0f} mm lesion inside the organ"
                             + (" within --z-mm" if z_range is not None else "") + "; ask for fewer or smaller")
        centre = np.array(np.unravel_index(rng.choice(idx), organ.shape))
        out.append((centre, float(d)))
        apart.append(distance_mm(organ.shape, centre, spacing_zyx))
    return out


def distance_mm(shape: tuple[int, ...], centre: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Each voxel's distance (mm) from the voxel ``centre``."""
    axes = [((np.arange(n) - c) * s) ** 2 for n, c, s in zip(shape, centre, spacing_zyx)]
    return np.sqrt(axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]).astype(np.float32)


def add_lesions(image: sitk.Image, label: sitk.Image, value: int, count: int, diameters: tuple[float, float],
                hu: float, blur_mm: float, z_range: tuple[float, float] | None,
                rng: np.random.Generator) -> tuple[sitk.Image, list[float], float]:
    """``image`` with ``count`` lesions in the structure ``value`` of ``label``, their diameters (mm)
    and the volume they hold (ml)."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    lab = sitk.GetArrayFromImage(sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    organ = lab == value
    if not organ.any():
        raise ValueError("the organ is not in the label map")
    spacing = np.asarray(image.GetSpacing()[::-1], float)              # z, y, x as the array is
    z_mm = np.array([image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(arr.shape[0])])
    lesions = place(organ, spacing, z_mm, count, diameters, z_range, rng)
    weight = np.zeros(arr.shape, np.float32)
    for centre, d in lesions:
        weight[distance_mm(arr.shape, centre, spacing) <= d / 2] = 1.0
    if blur_mm > 0:
        weight = ndimage.gaussian_filter(weight, blur_mm / spacing)
    weight *= organ                                                     # nothing outside the organ moves
    out = arr + weight * hu
    res = sitk.GetImageFromArray(np.round(out).astype(np.int16))
    res.CopyInformation(image)
    return res, [d for _, d in lesions], float((weight > 0.5).sum() * np.prod(spacing) / 1000)


def main(argv: list[str] | None = None) -> int:
    p = copy_parser(__doc__)
    p.add_argument("--organ", default="liver", help="the label the lesions lie in (default liver)")
    p.add_argument("--count", type=int, default=5, help="lesions per scan (default 5)")
    p.add_argument("--diameter-mm", type=float, nargs=2, default=(10.0, 35.0), metavar=("MIN", "MAX"),
                   help="their diameters are drawn between these (mm; default 10 35)")
    p.add_argument("--hu", type=float, default=-50.0, help="their density against the organ's (HU; default -50)")
    p.add_argument("--z-mm", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="world z range (mm) their centres lie in, e.g. an evaluation's held-out slab")
    p.add_argument("--blur-mm", type=float, default=1.5, help="Gaussian sigma of their border (mm; default 1.5)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if (opened := open_copy(a, "add_liver_lesions")) is None:
        return 2
    src, dst, names = opened
    if a.organ not in names:
        print(f"add_liver_lesions: no such label in {src}: {a.organ}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(a.seed)
    written = []
    try:
        for case, im, lf in case_files(src):
            out, ds, ml = add_lesions(sitk.ReadImage(str(im)), sitk.ReadImage(str(lf)), names[a.organ], a.count,
                                      tuple(a.diameter_mm), a.hu, a.blur_mm, a.z_mm, rng)
            written.append((im.name, out, lf))
            print(f"{case}: {len(ds)} lesions of {', '.join(f'{d:.0f}' for d in ds)} mm ({ml:.1f} ml), "
                  f"{a.hu:+g} HU, in the {a.organ}")
    except ValueError as e:                        # nothing is written when any scan has no room
        print(f"add_liver_lesions: {e}", file=sys.stderr)
        return 2
    (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dst / "labelsTr").mkdir(parents=True, exist_ok=True)
    for name, out, lf in written:
        sitk.WriteImage(out, str(dst / "imagesTr" / name))
        shutil.copy(lf, dst / "labelsTr" / lf.name)
    copy_dataset_json(src, dst)
    print(f"dataset with {a.organ} lesions written to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
