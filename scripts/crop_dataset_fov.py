#!/usr/bin/env python3
"""Copy an nnU-Net-style dataset with every scan (and label) cropped to a world-z range,
to test a model on another field of view of the same scans (as another hospital's
protocol would cover another part of the body), and, with --width-mm, cut left-right to
a smaller field (a small-field reconstruction that cuts the body's sides).

example:
  python scripts/crop_dataset_fov.py ../shared/data/ct-abdomen /tmp/ct-upper --z-min 250
  python scripts/crop_dataset_fov.py ../shared/data/ct-abdomen /tmp/ct-fov300 --width-mm 300
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset_copy import copy_dataset, copy_parser  # noqa: E402


def crop_z(image: sitk.Image, z_min: float, z_max: float) -> sitk.Image:
    """The slab of ``image`` whose voxel centres lie in [z_min, z_max] mm (world z), along the
    image axis closest to world z; the geometry (origin, direction, spacing) is kept exact."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(d[2, :])))
    size = list(image.GetSize())
    centre = [s // 2 for s in size]
    zs = []
    for k in range(size[axis]):
        idx = list(centre)
        idx[axis] = k
        zs.append(image.TransformIndexToPhysicalPoint(idx)[2])
    keep = [k for k, z in enumerate(zs) if z_min <= z <= z_max]
    if not keep:
        raise SystemExit(f"no slice of the image lies in z [{z_min}, {z_max}] mm")
    lo, hi = min(keep), max(keep)
    index = [0, 0, 0]
    index[axis] = lo
    out_size = list(size)
    out_size[axis] = hi - lo + 1
    return sitk.RegionOfInterest(image, out_size, index)


def crop_width(image: sitk.Image, width_mm: float) -> sitk.Image:
    """``image`` cut along the axis closest to world x (left-right) to a field ``width_mm`` wide about its
    centre, as a small-field reconstruction of a wider body is; the geometry is kept exact."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(d[0, :])))
    size = list(image.GetSize())
    keep = min(size[axis], max(1, int(round(width_mm / image.GetSpacing()[axis]))))
    index = [0, 0, 0]
    index[axis] = (size[axis] - keep) // 2
    out_size = list(size)
    out_size[axis] = keep
    return sitk.RegionOfInterest(image, out_size, index)


def main(argv: list[str] | None = None) -> int:
    p = copy_parser(__doc__)
    p.add_argument("--z-min", type=float, default=-1e9, help="lowest world z (mm) to keep")
    p.add_argument("--z-max", type=float, default=1e9, help="highest world z (mm) to keep")
    p.add_argument("--width-mm", type=float, default=None,
                   help="also cut the field of view left-right to this width (mm) about the image centre")
    a = p.parse_args(argv)
    src, dst = Path(a.dataset), Path(a.output)

    def crop(image: sitk.Image, is_label: bool) -> sitk.Image:
        out = crop_z(image, a.z_min, a.z_max)
        return out if a.width_mm is None else crop_width(out, a.width_mm)

    copy_dataset(src, dst, crop)
    print(f"cropped dataset written to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
