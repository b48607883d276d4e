#!/usr/bin/env python3
"""Copy an nnU-Net-style CT dataset with a thicker or thinner layer of subcutaneous fat: each axial slice's
body grows outward by up to --fat-mm of fat (-100 HU, the scan's own noise added), under a 2 mm
skin. The organs and their labels stay voxel for voxel; the scan keeps its size, so where the body
now reaches the edge of the reconstructed field of view it is cut off there, as a large person's
body often is. That is what a heavier person of the same build looks like on CT: the abdomen's
girth is mostly fat outside the muscle wall, the organs do not grow with it (the body-scaled copies
of scale_dataset_body.py grow the organs too). --fov-mm first widens the field of view (air around
the scan, the label padded alike) so that the fat is not cut off, as on a scanner's 500 mm field.
A negative --fat-mm takes that much fat away instead: the outline moves inward through the fat, never
closer than 3 mm to the muscle wall, and a 2 mm skin is laid on the new outline. That is a slimmer
person with the same organs, which a body-scaled copy (organs shrunk with the body) cannot show.

example:
  python scripts/add_body_fat.py ../shared/data/ct-abdomen /tmp/ct-body-fat --fat-mm 40
  python scripts/add_body_fat.py ../shared/data/ct-abdomen /tmp/ct-body-fat-500 --fat-mm 40 --fov-mm 500
  python scripts/add_body_fat.py ../shared/data/ct-abdomen /tmp/ct-body-lean --fat-mm -40
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import Delaunay, QhullError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset_copy import copy_dataset, copy_parser  # noqa: E402

from progidiff.volume import largest_region  # noqa: E402

#: Subcutaneous fat and skin (HU), typical values.
FAT_HU, SKIN_HU, SKIN_MM = -100.0, 30.0, 2.0
#: A voxel above this is body (or table); below it, air.
BODY_HU = -400.0
#: Fat lies below this (-190 to -30 HU); skin and muscle above it.
SOFT_TISSUE_HU = -30.0
#: Fat left between the muscle wall and the new skin where fat is taken away, mm.
KEEP_FAT_MM = 3.0


def body_outline(slice_hu: np.ndarray) -> np.ndarray:
    """The slice's body: its largest connected region above BODY_HU (the table, apart from it, is
    left out), holes (bowel gas, lungs) filled."""
    return ndimage.binary_fill_holes(largest_region(slice_hu > BODY_HU))


def pad_fov(image: sitk.Image, fov_mm: float, value: float) -> sitk.Image:
    """The image with its in-plane field of view widened to at least ``fov_mm`` (each axis, evenly on
    both sides) with ``value``; voxels keep their world positions, so an image and its label padded
    alike stay on one grid."""
    pad = [max(0, int(math.ceil((fov_mm / s - n) / 2))) for s, n in zip(image.GetSpacing()[:2], image.GetSize()[:2])]
    return sitk.ConstantPad(image, pad + [0], pad + [0], value)


def muscle_wall(slice_hu: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """The slice's body inside its muscle wall: the convex hull of its largest region of soft tissue
    (above SOFT_TISSUE_HU) once the outer 4 mm (the skin) is left out. A hull rather than the region
    with its holes filled: on 3 mm voxels the thin anterior wall (linea alba, rectus sheath) breaks the
    ring, and a broken ring fills nothing. The subcutaneous fat lies outside the hull; the fat between
    the back muscles' bulges, which lies inside it, is kept. ``depth``: each voxel's distance (mm) from
    outside the body, 0 outside it."""
    inner = depth > 4.0
    tissue = largest_region(ndimage.binary_closing(inner & (slice_hu > SOFT_TISSUE_HU), iterations=2))
    pts = np.argwhere(tissue)
    if len(pts) < 3:
        return tissue
    try:
        hull = Delaunay(pts)
    except QhullError:  # all on one line
        return tissue
    grid = np.indices(tissue.shape).reshape(2, -1).T
    return (hull.find_simplex(grid) >= 0).reshape(tissue.shape) & (depth > 0)


def strip_fat(arr: np.ndarray, strip_mm: float, noise: float, air_hu: float, spacing: tuple[float, float],
              rng: np.random.Generator) -> int:
    """Take up to ``strip_mm`` of subcutaneous fat off every slice of ``arr`` (z, y, x), in place:
    a body voxel within ``strip_mm`` of the outline and more than KEEP_FAT_MM outside the muscle wall
    becomes air, and the new outline gets a SKIN_MM skin where it lies in what was fat. Returns the
    number of voxels taken away."""
    taken = 0
    for k in range(arr.shape[0]):
        body = body_outline(arr[k])
        if not body.any():
            continue
        depth = ndimage.distance_transform_edt(body, sampling=spacing)
        wall = muscle_wall(arr[k], depth)
        if not wall.any():
            continue
        near_wall = ndimage.distance_transform_edt(~wall, sampling=spacing) <= KEEP_FAT_MM
        lean = body & ((depth > strip_mm) | near_wall)
        lean = ndimage.binary_fill_holes(largest_region(lean))
        gone = body & ~lean
        skin = lean & ~wall & (ndimage.distance_transform_edt(lean, sampling=spacing) <= SKIN_MM) \
            & (depth > SKIN_MM)
        g = grain(arr[k].shape, noise, rng)
        arr[k][gone] = air_hu + g[gone]
        arr[k][skin] = SKIN_HU + g[skin]
        taken += int(gone.sum())
    return taken


def grain(shape: tuple[int, ...], noise: float, rng: np.random.Generator) -> np.ndarray:
    """Noise at the scan's spread (``noise`` HU), correlated over about a voxel as a reconstruction
    kernel leaves it."""
    g = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 0.7)
    return g * (noise / g.std())


def grow_fat(arr: np.ndarray, fat_mm: float, noise: float, spacing: tuple[float, float],
             rng: np.random.Generator) -> None:
    """Grow every slice's body of ``arr`` (z, y, x) outward by ``fat_mm`` of fat under a SKIN_MM skin,
    in place."""
    for k in range(arr.shape[0]):
        body = body_outline(arr[k])
        if not body.any():
            continue
        dist = ndimage.distance_transform_edt(~body, sampling=spacing)
        grown = (dist > 0) & (dist <= fat_mm)
        skin = grown & (dist > fat_mm - SKIN_MM)
        fat = grown & ~skin
        g = grain(arr[k].shape, noise, rng)
        arr[k][fat] = FAT_HU + g[fat]
        arr[k][skin] = SKIN_HU + g[skin]


def add_fat(image: sitk.Image, fat_mm: float, rng: np.random.Generator, fov_mm: float = 0.0) -> sitk.Image:
    """The scan with ``fat_mm`` more subcutaneous fat (grow_fat), or with up to ``-fat_mm`` less where it is
    negative (strip_fat), after widening its field of view to ``fov_mm`` (pad_fov) if given."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    if int(np.argmax(np.abs(d[2, :]))) != 2:
        raise SystemExit("add_body_fat: the scan's slices are not its third axis (an axial stack); reorient it first")
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    # the scan's own noise, from the air outside the body (its spread, robustly), before any padding
    air = arr[arr < -900]
    noise = float(1.4826 * np.median(np.abs(air - np.median(air)))) if air.size > 100 else 10.0
    air_hu = float(np.median(air)) if air.size else -1000.0
    if fov_mm:
        image = pad_fov(image, fov_mm, air_hu)
        arr = sitk.GetArrayFromImage(image).astype(np.float32)
    sx, sy = image.GetSpacing()[:2]
    if fat_mm < 0:
        strip_fat(arr, -fat_mm, noise, air_hu, (sy, sx), rng)
    else:
        grow_fat(arr, fat_mm, noise, (sy, sx), rng)
    out = sitk.GetImageFromArray(np.round(arr).astype(sitk.GetArrayViewFromImage(image).dtype))
    out.CopyInformation(image)
    return out


def main(argv: list[str] | None = None) -> int:
    p = copy_parser(__doc__)
    p.add_argument("--fat-mm", type=float, default=40.0,
                   help="fat added outside the body's outline, mm (default 40); negative: fat taken away")
    p.add_argument("--fov-mm", type=float, default=0.0,
                   help="first widen the field of view to this many mm (air around the scan), so the fat is not cut off")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not (5.0 <= abs(a.fat_mm) <= 150.0):
        p.error(f"--fat-mm {a.fat_mm} is outside 5-150 mm (or -150 to -5 mm to take fat away)")
    rng = np.random.default_rng(a.seed)
    src, dst = Path(a.dataset), Path(a.output)
    def change(image: sitk.Image, label: bool) -> sitk.Image:
        if label:
            return pad_fov(image, a.fov_mm, 0) if a.fov_mm else image
        return add_fat(image, a.fat_mm, rng, a.fov_mm)

    copy_dataset(src, dst, change)
    more = f"{a.fat_mm:g} mm more" if a.fat_mm > 0 else f"up to {-a.fat_mm:g} mm less"
    print(f"dataset with {more} subcutaneous fat written to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
