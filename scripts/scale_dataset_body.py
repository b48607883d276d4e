#!/usr/bin/env python3
"""Copy an nnU-Net-style dataset with every scan (and label) made a narrower or wider body:
the in-plane voxel spacing is multiplied by a factor, so the same voxels describe a body
that factor's size across (0.85: a slimmer person or a child-sized abdomen; 1.15: a larger
one). Nothing is resampled: only the header changes, so image and label stay voxel-exact.
The slice axis is left alone, so held-out slabs (world z) stay where they were, and the
image centre keeps its world position.

example:
  python scripts/scale_dataset_body.py ../shared/data/ct-abdomen /tmp/ct-slim --factor 0.85
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset_copy import copy_dataset, copy_parser  # noqa: E402


def scale_in_plane(image: sitk.Image, factor: float) -> sitk.Image:
    """``image`` with the spacing of its two in-plane axes (those not closest to world z)
    multiplied by ``factor``, about the image centre."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    slice_axis = int(np.argmax(np.abs(d[2, :])))
    old_sp = np.array(image.GetSpacing())
    new_sp = old_sp * np.where(np.arange(3) == slice_axis, 1.0, factor)
    half = (np.array(image.GetSize()) - 1) / 2.0
    centre = np.array(image.GetOrigin()) + d @ (half * old_sp)
    out = sitk.Image(image)  # a copy: the header changes, the voxels do not
    out.SetSpacing(new_sp.tolist())
    out.SetOrigin((centre - d @ (half * new_sp)).tolist())
    return out


def main(argv: list[str] | None = None) -> int:
    p = copy_parser(__doc__)
    p.add_argument("--factor", type=float, required=True, help="in-plane size factor, e.g. 0.85 or 1.15")
    a = p.parse_args(argv)
    if not 0.5 <= a.factor <= 2.0:
        p.error(f"--factor {a.factor} is outside 0.5-2.0; a body that much smaller or larger is not a test of anything")
    src, dst = Path(a.dataset), Path(a.output)
    copy_dataset(src, dst, lambda image, label: scale_in_plane(image, a.factor))
    print(f"body-scaled dataset written to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
