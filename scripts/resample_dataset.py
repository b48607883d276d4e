#!/usr/bin/env python3
"""Copy an nnU-Net-style dataset with every scan resampled to another voxel spacing (and,
optionally, more image noise), to test a model on the resolution and dose another scanner or
protocol would give. Thicker voxels are averaged over their extent first (a Gaussian of the
new spacing, as a thick-slice reconstruction would), labels are resampled nearest-neighbour.
The world geometry (origin, direction, extent) is kept, so held-out slabs stay where they were.

example:
  python scripts/resample_dataset.py ../shared/data/ct-abdomen /tmp/ct-thick --spacing 1.5 1.5 5 --noise-hu 20
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset_copy import copy_dataset, copy_parser  # noqa: E402


def resample(image: sitk.Image, spacing: tuple[float, float, float], label: bool, noise: float = 0.0,
             seed: int = 0) -> sitk.Image:
    """``image`` on a grid of ``spacing`` (mm, x y z) covering the same world extent."""
    old_sp = np.array(image.GetSpacing())
    new_sp = np.array(spacing, float)
    size = [max(1, int(round(n * o / s))) for n, o, s in zip(image.GetSize(), old_sp, new_sp)]
    src = image
    if not label:
        # Where the new voxel is larger, blur with sigma ~ new/2.355 (FWHM = new spacing) minus
        # what the old voxel already integrated, so a 5 mm slice looks like a 5 mm reconstruction.
        sigma = np.sqrt(np.maximum((new_sp / 2.355) ** 2 - (old_sp / 2.355) ** 2, 0.0))
        src = sitk.Cast(image, sitk.sitkFloat32)
        if sigma.max() > 0:
            src = sitk.SmoothingRecursiveGaussian(src, [float(s) if s > 0 else 1e-3 for s in sigma])
    # Align the first voxel centre with the old image's first voxel edge + half a new voxel.
    d = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + d @ ((new_sp - old_sp) / 2)
    out = sitk.Resample(src, size, sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                        origin.tolist(), new_sp.tolist(), image.GetDirection(), 0.0,
                        image.GetPixelID() if label else sitk.sitkFloat32)
    if not label:
        arr = sitk.GetArrayFromImage(out)
        if noise > 0:
            arr = arr + np.random.default_rng(seed).normal(0.0, noise, arr.shape).astype(np.float32)
        res = sitk.GetImageFromArray(np.round(arr).astype(np.int16))
        res.CopyInformation(out)
        out = res
    return out


def main(argv: list[str] | None = None) -> int:
    p = copy_parser(__doc__)
    p.add_argument("--spacing", type=float, nargs=3, required=True, metavar=("X", "Y", "Z"), help="new spacing in mm")
    p.add_argument("--noise-hu", type=float, default=0.0, help="extra Gaussian image noise (standard deviation, image units)")
    a = p.parse_args(argv)
    src, dst = Path(a.dataset), Path(a.output)
    copy_dataset(src, dst, lambda image, label: resample(image, tuple(a.spacing), label, a.noise_hu))
    print(f"resampled dataset written to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
