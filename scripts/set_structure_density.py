#!/usr/bin/env python3
"""Copy a CT scan with some structures set to one density, carrying the scan's own noise: what an
unenhanced scan of the same body would show where a contrast-enhanced one is bright. With contrast a
heart's blood reads 300-500 HU; without it, blood and myocardium read 40-55 HU, close to a liver's
50-65 HU (and above a fatty liver's), and only the diaphragm and a rim of fat part the heart from the
liver dome. The noise is Gaussian, correlated and scaled so that the same measurement (the residual
of a 3 mm blur: its spread and its correlation with the next voxel) reads on the painted structure
what it reads on the tissue given by --noise-from: the structure looks neither smoother nor grainier
than its neighbours. The change is blurred by --blur-mm at the structure's border (partial volume).

example:
  python scripts/set_structure_density.py chest_cta.nii.gz unenhanced.nii.gz --hu 55 \\
      --mask heart.nii.gz aorta.nii.gz pulmonary_artery.nii.gz --noise-from liver.nii.gz
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

#: the blur whose residual measures noise: wide enough to keep the grain, narrow enough to follow
#: the tissue's own texture and edges (liver vessels, the heart's walls)
HIGH_PASS_MM = 3.0
#: Gaussian correlation widths (voxels) tried for the synthetic noise; the one whose next-voxel
#: correlation matches the scan's is used
CORRELATION_GRID = np.round(np.arange(0.3, 2.51, 0.1), 2)


def _on_grid(mask: sitk.Image, image: sitk.Image) -> np.ndarray:
    """``mask`` resampled onto ``image``'s grid (nearest neighbour, world coordinates), as bool."""
    return sitk.GetArrayFromImage(sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0


def _residual(arr: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    return arr - ndimage.gaussian_filter(arr, sigma_vox)


def noise_measures(arr: np.ndarray, region: np.ndarray, sigma_vox: np.ndarray) -> tuple[float, float]:
    """The spread (median absolute deviation x 1.4826, which a vessel or an edge barely moves) and the
    correlation with the next voxel along the fastest axis of the high-pass residual inside ``region``."""
    res = _residual(arr.astype(np.float32), sigma_vox)
    inner = region[..., :-1] & region[..., 1:]
    a, b = res[..., :-1][inner], res[..., 1:][inner]
    spread = float(np.median(np.abs(a - np.median(a))) * 1.4826)
    return spread, float(np.corrcoef(a, b)[0, 1])


def matched_noise(shape: tuple[int, ...], spread: float, rho: float, sigma_vox: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of ``shape`` whose noise_measures are ``spread`` and ``rho``: white noise blurred by
    the width (from CORRELATION_GRID) that gives that correlation, then scaled to that spread."""
    probe = rng.standard_normal((48, 48, 48)).astype(np.float32)
    everywhere = np.ones(probe.shape, bool)
    rhos = [noise_measures(ndimage.gaussian_filter(probe, s), everywhere, sigma_vox)[1] for s in CORRELATION_GRID]
    width = float(CORRELATION_GRID[int(np.argmin(np.abs(np.asarray(rhos) - rho)))])
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), width)
    got = noise_measures(field, np.ones(shape, bool), sigma_vox)[0]
    return field * (spread / got)


def set_density(image: sitk.Image, masks: list[sitk.Image], hu: float, noise_from: sitk.Image,
                blur_mm: float = 1.0, seed: int = 0) -> tuple[sitk.Image, dict[str, float]]:
    """``image`` with the union of ``masks`` set to ``hu`` plus noise matched to ``noise_from``'s tissue
    (the part of its mask more than two high-pass widths from its border, where the residual holds the
    noise and not the border's step), and the measures used."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing = np.asarray(image.GetSpacing()[::-1], float)          # z, y, x as the array is
    sigma_vox = HIGH_PASS_MM / spacing
    target = np.zeros(arr.shape, bool)
    for m in masks:
        target |= _on_grid(m, image)
    if not target.any():
        raise ValueError("the masks hold no voxel of the scan")
    ref = ndimage.distance_transform_edt(_on_grid(noise_from, image), sampling=spacing) > 2 * HIGH_PASS_MM
    if ref.sum() < 1000:
        raise ValueError(f"--noise-from holds {int(ref.sum())} voxels of the scan more than {2 * HIGH_PASS_MM:g} mm "
                         "inside its border; at least 1000 are needed to measure the noise")
    spread, rho = noise_measures(arr, ref, sigma_vox)
    noise = matched_noise(arr.shape, spread, rho, sigma_vox, np.random.default_rng(seed))
    weight = target.astype(np.float32)
    if blur_mm > 0:
        weight = ndimage.gaussian_filter(weight, blur_mm / spacing)
    out = (1 - weight) * arr + weight * (hu + noise)
    res = sitk.GetImageFromArray(np.round(out).astype(np.int16))
    res.CopyInformation(image)
    return res, {"noise_spread_hu": spread, "noise_next_voxel_correlation": rho,
                 "painted_ml": float(target.sum() * np.prod(spacing) / 1000)}


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description=doc[0], epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image")
    p.add_argument("output")
    p.add_argument("--mask", nargs="+", required=True, help="structure masks (any grid in the same world space)")
    p.add_argument("--hu", type=float, required=True, help="the density they are given")
    p.add_argument("--noise-from", required=True, help="a mask of tissue whose noise the painted voxels carry")
    p.add_argument("--blur-mm", type=float, default=1.0, help="Gaussian sigma of the change at the border (mm)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        image = sitk.ReadImage(a.image)
        masks = [sitk.ReadImage(m) for m in a.mask]
        ref = sitk.ReadImage(a.noise_from)
        out, used = set_density(image, masks, a.hu, ref, a.blur_mm, a.seed)
    except (RuntimeError, ValueError) as e:      # SimpleITK's read errors are RuntimeErrors
        print(f"set_structure_density: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, a.output)
    print(f"{used['painted_ml']:.0f} ml set to {a.hu:g} HU with noise of spread {used['noise_spread_hu']:.1f} HU "
          f"(next-voxel correlation {used['noise_next_voxel_correlation']:.2f}); written to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
