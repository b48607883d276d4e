#!/usr/bin/env python3
"""Copy an nnU-Net-style dataset with every scan made to look contrast-enhanced (portal-venous
phase), organ by organ from its own labels: most abdominal CT is taken after an iodine injection,
and ../shared/data/ct-abdomen is not (its aorta is at 41 HU, its liver at 46). Each labelled
structure in ENHANCEMENT_HU gains that many HU, the gain blurred by --blur-mm at the borders (the
partial volume of a real scan); everything else, labels included, is copied unchanged.

--organ NAME=HU (repeatable) replaces the table with the given changes, e.g. a fatty liver, the
commonest diffuse liver disease (about a quarter of adults): on an unenhanced CT its liver reads
below the spleen, 0-40 HU where a healthy liver reads 50-65.

examples:
  python scripts/enhance_dataset_contrast.py ../shared/data/ct-abdomen /tmp/ct-portal-venous
  python scripts/enhance_dataset_contrast.py ../shared/data/ct-abdomen /tmp/ct-fatty-liver --organ liver=-40
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from progidiff.data import CONTRAST_GAIN_HU

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset_copy import case_files, copy_dataset_json, copy_parser, label_values  # noqa: E402

#: HU gained over the unenhanced scan in a portal-venous phase (about 70 s after injection), typical
#: adult values: the organs the engine's contrast-phase augmentation enhances (vessels 90-120,
#: kidneys at their nephrographic ~120, spleen, pancreas and liver 55-70), and the labelled
#: structures it has no masks for. Bile, stomach and bowel contents and fat gain nothing.
ENHANCEMENT_HU = {**CONTRAST_GAIN_HU, "iliac_artery_left": 120, "iliac_artery_right": 120,
                  "portal_vein_and_splenic_vein": 130, "iliac_vena_left": 70, "iliac_vena_right": 70,
                  "adrenal_gland_left": 40, "adrenal_gland_right": 40, "heart": 110}


def enhance(image: sitk.Image, label: sitk.Image, names: dict[str, int], blur_mm: float, scale: float,
            gains: dict[str, float] = ENHANCEMENT_HU) -> sitk.Image:
    """``image`` with each structure of ``gains`` in ``label`` raised by its gain x ``scale``."""
    lab = sitk.GetArrayFromImage(sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    gain = np.zeros(lab.shape, np.float32)
    for name, hu in gains.items():
        if name in names:
            gain[lab == names[name]] = hu * scale
    g = sitk.GetImageFromArray(gain)
    g.CopyInformation(image)
    if blur_mm > 0:
        g = sitk.SmoothingRecursiveGaussian(g, blur_mm)
    out = sitk.GetArrayFromImage(image).astype(np.float32) + sitk.GetArrayFromImage(g)
    res = sitk.GetImageFromArray(np.round(out).astype(np.int16))
    res.CopyInformation(image)
    return res


def main(argv: list[str] | None = None) -> int:
    p = copy_parser(__doc__)
    p.add_argument("--blur-mm", type=float, default=1.5, help="Gaussian sigma of the gain at organ borders (mm)")
    p.add_argument("--scale", type=float, default=1.0, help="times the typical gains (e.g. 0.5 for a weak bolus)")
    p.add_argument("--organ", action="append", default=[], metavar="NAME=HU",
                   help="change only these structures, by HU each (replaces the contrast table; repeatable)")
    a = p.parse_args(argv)
    try:
        gains = {k: float(v) for k, v in (o.split("=", 1) for o in a.organ)} if a.organ else ENHANCEMENT_HU
    except ValueError:
        print(f"enhance_dataset_contrast: --organ takes NAME=HU, got {a.organ}", file=sys.stderr)
        return 2
    src, dst = Path(a.dataset), Path(a.output)
    if not (src / "dataset.json").is_file():
        print(f"enhance_dataset_contrast: {src} is not a dataset (no dataset.json)", file=sys.stderr)
        return 2
    names = label_values(src)
    unknown = sorted(set(gains) - set(names))
    if a.organ and unknown:
        print(f"enhance_dataset_contrast: no such label in {src}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dst / "labelsTr").mkdir(parents=True, exist_ok=True)
    for _, im, lf in case_files(src):
        image, label = sitk.ReadImage(str(im)), sitk.ReadImage(str(lf))
        sitk.WriteImage(enhance(image, label, names, a.blur_mm, a.scale, gains), str(dst / "imagesTr" / im.name))
        shutil.copy(lf, dst / "labelsTr" / lf.name)
    copy_dataset_json(src, dst)
    print(f"{'changed' if a.organ else 'contrast-enhanced'} dataset written to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
