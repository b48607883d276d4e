#!/usr/bin/env python3
"""Write a CT-like copy of a labelled dataset: every labelled structure painted with the Hounsfield
units the same structure has on a real CT, the unlabelled body as fat or soft tissue, air outside.
There is one CT person in ../shared/data; painting the MR person's labels gives the CT model another
person's organ shapes, sizes and positions to segment (another body, not another scanner: the
intensities are the CT person's, and every organ border is exactly its label's, sharper than on a real
scan). Painting the CT person from its own labels measures what painting alone changes.

How it paints (the label-to-image idea of SynthSeg, Billot et al. 2023, with the intensities measured
rather than drawn at random, because the model has to recognise CT, not any contrast):
  - a structure's HU: the median and spread (IQR / 1.349) of that structure on the reference CT, its
    mask eroded by one voxel (whichever structure it borders) so that borders do not leak in; a name the reference lacks is matched by
    family (``vertebrae`` to ``vertebrae_L1`` ...; ``lung_left`` to the left lobes), else soft tissue;
  - the unlabelled body: the source scan's body (Otsu threshold, holes filled slice by slice) split
    in two by Otsu on the middle 90 % of the source's own intensities there; of the two, fat is the class farther from the
    source's labelled muscles (darker on CT, brighter on this MR), soft tissue the other, both with
    the reference CT's unlabelled fat (-200..-30 HU) and soft tissue (-30..100 HU) statistics;
  - borders blurred by ``--blur-mm`` (partial volume), then noise correlated over about a voxel, scaled
    per structure to its spread (at most MAX_SD_HU).

example:
  python scripts/paint_ct_from_labels.py ../shared/data/mr-abdomen ../shared/data/ct-abdomen runs/painted/mr-person-as-ct \
      --preview mr-person-as-ct.png
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from progidiff.data import read_dataset, read_label
from progidiff.errors import InputError

#: Label-name families (TotalSegmentator's "total" and "total_mr" tasks name some structures
#: differently): a source name missing from the reference takes the pooled statistics of these.
FAMILIES = {"vertebrae": "vertebrae_", "lung_left": "lung_", "lung_right": "lung_", "ribs": "rib_"}
AIR_HU, AIR_SD = -1000.0, 10.0
#: A structure's spread is capped here: the colon's (238 HU on the CT person) is its gas against its wall,
#: which a flat paint cannot place; 40 HU is above the solid organs' and muscles' (soft tissue 32, pancreas 21,
#: fat 21, liver 12) and keeps part of the bones' (ribs up to 96).
MAX_SD_HU = 40.0


def _robust(values: np.ndarray) -> tuple[float, float]:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return float(med), float((q3 - q1) / 1.349)


def reference_hu(image: sitk.Image, label: sitk.Image, names: dict[str, int]) -> dict[str, tuple[float, float]]:
    """Median and robust spread of every labelled structure on the reference CT (eroded masks), and
    of its unlabelled ``fat`` and ``soft`` tissue inside the body."""
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    lab = sitk.GetArrayFromImage(label)
    # a voxel is inside its structure when its whole 3x3x3 neighbourhood has its label (largest = smallest
    # label there): every structure eroded by one voxel at once, whichever label it borders
    interior = (sitk.GetArrayFromImage(sitk.GrayscaleDilate(label, [1, 1, 1]))
                == sitk.GetArrayFromImage(sitk.GrayscaleErode(label, [1, 1, 1])))
    stats: dict[str, tuple[float, float]] = {}
    for name, value in names.items():
        if not value:
            continue
        inner = (lab == value) & interior
        if inner.sum() >= 20:
            stats[name] = _robust(hu[inner])
        elif (lab == value).sum() >= 20:
            stats[name] = _robust(hu[lab == value])
    free = (lab == 0) & interior
    stats["fat"] = _robust(hu[free & (hu > -200) & (hu < -30)])
    stats["soft"] = _robust(hu[free & (hu >= -30) & (hu < 100)])
    return stats


def structure_hu(name: str, stats: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """The reference statistics for a source structure's name: its own, its family's, or soft tissue."""
    if name in stats:
        return stats[name]
    prefix = FAMILIES.get(name)
    side = name.rsplit("_", 1)[-1] if name.startswith("lung_") else ""
    members = [v for k, v in stats.items() if prefix and k.startswith(prefix) and (not side or side in k)]
    if members:
        return float(np.median([m for m, _ in members])), float(np.median([s for _, s in members]))
    return stats["soft"]


def body_mask(image: sitk.Image) -> np.ndarray:
    """The body: above an Otsu threshold of the whole scan, holes filled slice by slice, largest part."""
    fg = sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1)
    fg = sitk.BinaryMorphologicalClosing(fg, [2, 2, 0])
    arr = sitk.GetArrayFromImage(fg)
    filled = np.stack([sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(s))) for s in arr])
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(filled.astype(np.uint8))))
    return sitk.GetArrayFromImage(cc) == 1


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a sample of intensities (SimpleITK's filter, on the sample as a 1-row image)."""
    f = sitk.OtsuThresholdImageFilter()
    f.SetNumberOfHistogramBins(256)
    f.Execute(sitk.GetImageFromArray(values.astype(np.float32).reshape(1, 1, -1)))
    return float(f.GetThreshold())


def paint(source: sitk.Image, label: sitk.Image, names: dict[str, int], stats: dict[str, tuple[float, float]],
          blur_mm: float, rng: np.random.Generator) -> sitk.Image:
    """A CT-like image on ``source``'s grid from its ``label``, on that grid (see the module's docstring)."""
    lab = sitk.GetArrayFromImage(label)
    src = sitk.GetArrayFromImage(source).astype(np.float32)
    muscles = [v for k, v in names.items() if k.startswith(("autochthon", "iliopsoas", "gluteus"))]
    if not np.isin(lab, muscles).any():
        raise SystemExit("paint_ct_from_labels: the source labels hold no muscle (autochthon, iliopsoas, gluteus); "
                         "cannot tell fat from soft tissue")
    muscle = float(np.median(src[np.isin(lab, muscles)]))
    mean = np.full(lab.shape, AIR_HU, np.float32)
    sd = np.full(lab.shape, AIR_SD, np.float32)
    body = body_mask(source) | (lab > 0)
    free = body & (lab == 0)
    # the middle 90 % only: air trapped in the body (bowel gas, the skin fold) would otherwise take
    # one of Otsu's two classes (on the CT person: a threshold of -272 HU, air against all tissue)
    lo, hi = np.percentile(src[free], [5, 95])
    threshold = otsu_threshold(np.clip(src[free], lo, hi))
    bright = free & (src > threshold)
    dark = free & ~bright
    fat_is_bright = abs(float(np.median(src[bright])) - muscle) > abs(float(np.median(src[dark])) - muscle)
    for region, tissue in ((bright, "fat" if fat_is_bright else "soft"), (dark, "soft" if fat_is_bright else "fat")):
        mean[region], sd[region] = stats[tissue]
    for name, value in names.items():
        if value and (lab == value).any():
            mean[lab == value], sd[lab == value] = structure_hu(name, stats)
    img = sitk.GetImageFromArray(mean)
    img.CopyInformation(source)
    if blur_mm > 0:
        img = sitk.SmoothingRecursiveGaussian(img, blur_mm)
    noise = sitk.GetImageFromArray(rng.standard_normal(lab.shape).astype(np.float32))
    noise.CopyInformation(source)
    # correlated over about a voxel, as CT noise is after reconstruction; rescaled to unit spread
    noise = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, float(min(source.GetSpacing())) * 0.5))
    noise /= max(float(noise.std()), 1e-6)
    out = sitk.GetArrayFromImage(img) + noise * np.minimum(sd, MAX_SD_HU)
    res = sitk.GetImageFromArray(np.clip(np.round(out), -1024, 3071).astype(np.int16))
    res.CopyInformation(source)
    return res


def preview(pairs: list[tuple[str, Path, Path, Path]], liver: int | None, source_is_ct: bool, png: Path) -> None:
    """Each case's source scan beside its painted CT (abdominal window, -160..240 HU; the source in its
    own 1st-99th percentiles unless it is CT), axial, patient's right on the left, at the slice with the
    most liver (the middle slice when the labels name no liver)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), 2, figsize=(8, 4 * len(pairs)), squeeze=False)
    for (case, source, label, painted), row in zip(pairs, axes):
        lab = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(label)), "LPS"))
        k = int(np.argmax((lab == liver).sum((1, 2)))) if liver is not None and (lab == liver).any() else lab.shape[0] // 2
        for ax, path, title, window in ((row[0], source, f"{case}: source", (-160, 240) if source_is_ct else None),
                                        (row[1], painted, f"{case}: painted as CT", (-160, 240))):
            arr = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))
            vmin, vmax = window or np.percentile(arr, [1, 99])
            ax.imshow(arr[k], cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_title(title)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=60)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="the labelled dataset to paint (any modality)")
    p.add_argument("reference", help="a labelled CT dataset whose first case gives the Hounsfield units")
    p.add_argument("output")
    p.add_argument("--blur-mm", type=float, default=1.0, help="Gaussian sigma at structure borders (mm)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--preview", metavar="PNG", help="also draw each case's source and painted scan (the axial slice with the most liver)")
    a = p.parse_args(argv)
    src, ref, dst = Path(a.source), Path(a.reference), Path(a.output)
    # read_dataset / read_label: the engine's dataset reading (label names, hidden files, file_ending) and its
    # check that a label lies on its image's grid, so painting reads a dataset as train and evaluate do
    try:
        info, ref_info = read_dataset(src), read_dataset(ref)
        ref_case = next((c for c in ref_info.cases if c.label is not None), None)
        if ref_case is None:
            raise InputError(f"{ref}: no case has a label file in labelsTr/")
        ref_img = sitk.ReadImage(str(ref_case.image))
        stats = reference_hu(ref_img, read_label(ref_case, ref_img), ref_info.labels)
        (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
        (dst / "labelsTr").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(a.seed)
        pairs = []
        for case in (c for c in info.cases if c.label is not None):
            source = sitk.ReadImage(str(case.image))
            painted = paint(source, read_label(case, source), info.labels, stats, a.blur_mm, rng)
            sitk.WriteImage(painted, str(dst / "imagesTr" / case.image.name))
            pairs.append((case.name, case.image, case.label, dst / "imagesTr" / case.image.name))
            shutil.copy(case.label, dst / "labelsTr" / case.label.name)
    except InputError as exc:
        print(f"paint_ct_from_labels: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((src / "dataset.json").read_text(encoding="utf-8"))
    meta["channel_names"] = {"0": "CT"}
    meta["description"] = (f"{src.name}'s labels painted as CT with {ref.name}'s Hounsfield units "
                           f"(scripts/paint_ct_from_labels.py): not a real scan")
    (dst / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if a.preview:
        preview(pairs, info.labels.get("liver"), info.modality == "CT", Path(a.preview))
    print(f"painted CT dataset written to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
