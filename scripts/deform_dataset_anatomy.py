#!/usr/bin/env python3
"""Copy an nnU-Net-style dataset with every scan (and label) warped by one smooth random
in-plane deformation: organs change shape and shift against each other (by up to --max-mm,
about half that in practice), as they differ between people, which the other robustness
datasets (field of view, resolution and noise, body size) leave alone. Nothing moves along world z, so a held-out
slab keeps the anatomy it had. The field depends only on --seed and the scan's grid, so a
scan and its label (same grid) get the same one.

example:
  python scripts/deform_dataset_anatomy.py ../shared/data/ct-abdomen /tmp/ct-deformed --max-mm 20 --spacing-mm 100
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset_copy import copy_dataset, copy_parser  # noqa: E402


def warp(grid: sitk.Image, max_mm: float, spacing_mm: float, seed: int) -> sitk.BSplineTransform:
    """A cubic B-spline deformation over ``grid``'s extent with control points about ``spacing_mm``
    apart, whose coefficients are uniform in [-max_mm, max_mm] along world x and y and zero along
    world z. A B-spline is a weighted mean of its coefficients, so no point moves more than
    ``max_mm`` along x or y. (SimpleITK's B-spline rather than smoothed noise: a Gaussian-smoothed
    noise field is several times stronger at the borders than inside, where the organs are.)"""
    extent = np.array(grid.GetSize()) * np.array(grid.GetSpacing())
    mesh = [max(1, int(round(e / spacing_mm))) for e in extent]
    transform = sitk.BSplineTransformInitializer(grid, mesh, 3)
    n = len(transform.GetParameters()) // 3            # parameters: every x, then every y, then every z
    rng = np.random.default_rng(seed)
    transform.SetParameters(np.concatenate([rng.uniform(-max_mm, max_mm, 2 * n), np.zeros(n)]).tolist())
    return transform


def deform(image: sitk.Image, label: bool, max_mm: float, spacing_mm: float, seed: int) -> sitk.Image:
    """``image`` warped by ``warp`` of its own grid; labels nearest-neighbour, scans linear with the
    scan's minimum (air) outside."""
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    outside = 0 if label else float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, image, warp(image, max_mm, spacing_mm, seed), interp, outside, image.GetPixelID())


def displacement_mm(grid: sitk.Image, transform: sitk.Transform, samples: int = 3000) -> tuple[float, float]:
    """Mean and largest displacement (mm) of ``samples`` voxel centres of ``grid`` drawn at random."""
    rng = np.random.default_rng(1)
    moves = []
    for ijk in rng.integers(0, grid.GetSize(), (samples, 3)):
        p = grid.TransformIndexToPhysicalPoint([int(v) for v in ijk])
        moves.append(np.linalg.norm(np.subtract(transform.TransformPoint(p), p)))
    return float(np.mean(moves)), float(np.max(moves))


def main(argv: list[str] | None = None) -> int:
    p = copy_parser(__doc__)
    p.add_argument("--max-mm", type=float, default=20.0,
                   help="largest control-point displacement along world x and y, mm (default 20; on the CT of "
                        "../shared/data this moves voxels 4.8 mm on average and up to about 10 mm)")
    p.add_argument("--spacing-mm", type=float, default=100.0,
                   help="distance between the warp's control points, mm (default 100; smaller bends organs more)")
    p.add_argument("--seed", type=int, default=0, help="the field's random seed (default 0)")
    a = p.parse_args(argv)
    # A cubic B-spline warp is one-to-one when no coefficient exceeds about 0.4 control-point spacings
    # (Choi & Lee 2000, as used by Rueckert et al. 2006); half that keeps a margin.
    if not 0 < a.max_mm <= 0.2 * a.spacing_mm:
        p.error(f"--max-mm must be above 0 and at most a fifth of --spacing-mm ({0.2 * a.spacing_mm:g} mm): "
                "a stronger warp could fold the anatomy over itself")
    src, dst = Path(a.dataset), Path(a.output)
    if not (src / "dataset.json").is_file():
        p.error(f"{src} is not an nnU-Net-style dataset (no dataset.json)")
    copy_dataset(src, dst, lambda image, label: deform(image, label, a.max_mm, a.spacing_mm, a.seed))
    for f in sorted((dst / "imagesTr").glob("*.nii*")):
        grid = sitk.ReadImage(str(f))
        mean, most = displacement_mm(grid, warp(grid, a.max_mm, a.spacing_mm, a.seed))
        print(f"{f.name}: voxels moved {mean:.1f} mm on average, up to {most:.1f} mm (3,000 sampled)")
    print(f"deformed dataset written to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
