"""Labelled datasets on disk, as researchers have them: nnU-Net's layout, the Medical Segmentation
Decathlon's ("training" list, any file names), images and labels of one name, and the TotalSegmentator
dataset's (a folder per case, one mask file per structure); and each case's label map, checked
against its image's grid."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .volume import IMAGE_SUFFIXES, _check_complete, _first_line, case_name

log = logging.getLogger(__name__)


#: The TotalSegmentator dataset's layout, which TotalSegmentator's own output also has: a folder per case
#: with its scan and a folder of one binary mask per structure, each file named after its structure.
TS_SCANS = ("ct.nii.gz", "mri.nii.gz")
TS_MASKS = "segmentations"
MASK_SUFFIX = ".nii.gz"


@dataclass
class CaseEntry:
    name: str
    image: Path
    label: Path | None        # a label map, or a folder of one mask file per structure (TS_MASKS)
    split: str | None = None  # the dataset's own split of it ("train", "val", "test"), where it records one


@dataclass
class DatasetInfo:
    root: Path
    labels: dict[str, int]
    modality: str | None
    cases: list[CaseEntry]
    #: dataset.json's "description": what the data is (evaluate's report and the model card repeat it, so that
    #: numbers measured on a simulated dataset say so wherever they are shown)
    description: str = ""


def read_dataset(root: str | os.PathLike) -> DatasetInfo:
    """Parse ``dataset.json`` (nnU-Net v2 ``labels: {name: value}`` or MSD ``{value: name}``) and find the cases.

    Cases, in this order of precedence: nnU-Net's ``imagesTr/CASE_0000.nii.gz`` with ``labelsTr/CASE.nii.gz``;
    else MSD's ``"training"`` list of ``{"image", "label"}`` paths (the Medical Segmentation Decathlon's tasks,
    AMOS, MONAI's BTCV, whose files are not named ``CASE_0000``); else images and labels of one file name.
    ``root`` is the dataset's folder or its JSON file, when that is not named dataset.json. A folder
    without dataset.json whose case folders hold ct.nii.gz (or mri.nii.gz) and segmentations/ is read as
    the TotalSegmentator dataset (totalsegmentator_dataset)."""
    r = Path(root)
    meta_path = r / "dataset.json"
    if r.is_dir() and not meta_path.is_file() and (ts := totalsegmentator_dataset(r)) is not None:
        return ts
    if r.suffix.lower() == ".json" and r.is_file():  # a dataset file of another name: MONAI's BTCV "dataset_0.json"
        r, meta_path = r.parent, r
    if not meta_path.is_file():
        raise InputError(f"{r}: no dataset.json; a dataset folder holds imagesTr/, labelsTr/ and dataset.json (nnU-Net's "
                         "layout), or a folder per case with ct.nii.gz and segmentations/ (TotalSegmentator's).")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{meta_path}: is not valid JSON ({exc}).") from exc
    raw = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise InputError(f'{meta_path}: needs "labels", label names to values, e.g. {{"background": 0, "liver": 1}} '
                         '(nnU-Net) or {"0": "background", "1": "liver"} (MSD).')
    labels: dict[str, int] = {}
    for k, v in raw.items():
        if isinstance(v, list) and len(v) > 1:
            # nnU-Net's region labels ("kidney": [1, 2, 3]) overlap by design; taking one of the values would
            # silently score part of the organ as background.
            raise InputError(f'{meta_path}: label "{k}" is a region of several values {json.dumps(v)}; ProGiDiff reads '
                             "one value per label: list each class once, as nnU-Net's non-region datasets do.")
        try:
            if isinstance(v, str) and str(k).lstrip("-").isdigit():
                labels[v] = int(k)  # MSD: {"1": "liver"}
            else:
                labels[str(k)] = int(v if not isinstance(v, list) else v[0])
        except (TypeError, ValueError, IndexError):
            raise InputError(f'{meta_path}: label "{k}" has the value {json.dumps(v)}; a label value is an integer.') from None
    chans = meta.get("channel_names") or meta.get("modality") or {}
    modality = None
    if chans:
        first = str(list(chans.values())[0]).upper()
        modality = "CT" if "CT" in first else ("MR" if first.startswith("MR") or "T1" in first or "T2" in first else None)
    cases = _cases(r, meta_path, meta)
    names = [c.name for c in cases]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"{meta_path}: two cases are named {twice[0]}; held-out cases and slabs are kept by name, so "
                         "each case needs a name of its own.")
    description = meta.get("description") if isinstance(meta.get("description"), str) else ""
    return DatasetInfo(r, labels, modality, cases, " ".join(description.split()))


def _listed_cases(root: Path, meta_path: Path, listed: list) -> list[CaseEntry]:
    """MSD's ``"training": [{"image": "./imagesTr/spleen_19.nii.gz", "label": "./labelsTr/spleen_19.nii.gz"}]``.
    A listed file that is not there is a broken dataset: refused, naming it, rather than trained without."""
    cases = []
    for item in listed:
        image = item.get("image") if isinstance(item, dict) else None
        if not isinstance(image, str) or not image:
            raise InputError(f'{meta_path}: each "training" entry is {{"image": PATH, "label": PATH}}; one is {json.dumps(item)[:80]}.')
        label = item.get("label")
        paths = [root / image] + ([root / label] if isinstance(label, str) and label else [])
        for path in paths:
            if not path.is_file():
                raise InputError(f'{meta_path}: its "training" list names {os.path.relpath(path, root)}, which is not there.')
        cases.append(CaseEntry(case_name(paths[0]), paths[0], paths[1] if len(paths) > 1 else None))
    return cases


def _cases(root: Path, meta_path: Path, meta: dict) -> list[CaseEntry]:
    """nnU-Net's ``CASE_0000`` images (the first channel; nnU-Net v1 lists them in "training" without the
    suffix, so these files come first), else MSD's "training" list, else images and labels of one file
    name each. Hidden files are skipped: macOS leaves "._CASE_0000.nii.gz" beside each file it copies,
    which is no image. nnU-Net v2's "file_ending" says which files are images, when given."""
    ending = meta.get("file_ending") if isinstance(meta.get("file_ending"), str) else ""
    files = sorted(p for p in (root / "imagesTr").glob("*") if not p.name.startswith(".") and p.is_file()
                   and p.name.endswith(ending) and p.name.lower().endswith(IMAGE_SUFFIXES))
    channel0 = [p for p in files if "_0000." in p.name]
    cases = []
    if channel0:
        for img in channel0:
            name = img.name.split("_0000.")[0]
            lab = root / "labelsTr" / f"{name}{img.name[len(name) + len('_0000'):]}"
            cases.append(CaseEntry(name, img, lab if lab.is_file() else None))
        return cases
    listed = meta.get("training")
    if isinstance(listed, list) and listed:
        return _listed_cases(root, meta_path, listed)
    for img in files:  # one file name for image and label, as MSD's folders without a "training" list
        lab = root / "labelsTr" / img.name
        cases.append(CaseEntry(case_name(img), img, lab if lab.is_file() else None))
    if not cases:
        raise InputError(f"{root / 'imagesTr'}: no images (CASE_0000{ending or '.nii.gz'} as nnU-Net names them, or "
                         'listed in dataset.json\'s "training" as MSD does).')
    return cases


def totalsegmentator_dataset(root: Path) -> DatasetInfo | None:
    """The TotalSegmentator dataset (``s0000/ct.nii.gz``, ``s0000/segmentations/liver.nii.gz``, ...), or None
    where ``root`` has no such case folder. The labels are the structures' file names, numbered in name
    order; read_label paints a case's label map from their files. meta.csv's "split" column, when there,
    is each case's split (evaluate --split)."""
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and any((d / n).is_file() for n in TS_SCANS))
    if not folders:
        return None
    splits = _meta_splits(root / "meta.csv")
    cases, structures, modalities = [], set(), set()
    for d in folders:
        scan = next(d / n for n in TS_SCANS if (d / n).is_file())
        modalities.add("CT" if scan.name == TS_SCANS[0] else "MR")
        masks = {p.name[: -len(MASK_SUFFIX)] for p in (d / TS_MASKS).glob(f"*{MASK_SUFFIX}")
                 if not p.name.startswith(".")} if (d / TS_MASKS).is_dir() else set()
        structures |= masks
        cases.append(CaseEntry(d.name, scan, d / TS_MASKS if masks else None, splits.get(d.name)))
    labels = {"background": 0, **{name: i + 1 for i, name in enumerate(sorted(structures))}}
    modality = modalities.pop() if len(modalities) == 1 else None
    return DatasetInfo(root, labels, modality, cases)


def _meta_splits(path: Path) -> dict[str, str]:
    """TotalSegmentator's meta.csv (";"-separated, "image_id" and "split" columns): case -> split."""
    import csv

    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    rows = list(csv.DictReader(text.splitlines(), delimiter=";" if text.count(";") > text.count(",") else ","))
    return {r["image_id"].strip(): r["split"].strip() for r in rows
            if (r.get("image_id") or "").strip() and (r.get("split") or "").strip()}


def cases_in_split(cases: list[CaseEntry], split: str | None, dataset: str | os.PathLike) -> list[CaseEntry]:
    """The cases of ``split`` (train and evaluate --split), or all of them with None. Refused where the
    dataset records no split, or none of these cases is in that one."""
    if split is None:
        return cases
    recorded = sorted({c.split for c in cases if c.split})
    if not recorded:
        raise InputError(f"{dataset}: records no split of its cases (TotalSegmentator's meta.csv does); leave out --split.")
    if split not in recorded:
        raise InputError(f"{dataset}: no labelled case is in split {split!r}; its splits: {', '.join(recorded)}.")
    return [c for c in cases if c.split == split]


def read_label(entry: CaseEntry, image: sitk.Image, labels: dict[str, int] | None = None,
               values: Iterable[int] | None = None) -> sitk.Image:
    """The case's label map, refused unless it lies on the grid of ``image`` (its scan, as read):
    the nnU-Net convention, and what every voxel-wise use of it assumes. A label cropped or shifted
    against its scan would otherwise train or score background where the organ is.

    A folder of one mask per structure (TotalSegmentator's) is painted into a label map with the
    values of ``labels`` (name -> value), only those in ``values`` when given: reading all 117 of a
    TotalSegmentator case's masks to score nine organs would be most of the time spent."""
    assert entry.label is not None
    if entry.label.is_dir():
        if labels is None:
            raise ValueError("a folder of masks needs the dataset's labels to paint a label map")
        wanted = set(values) if values is not None else set(labels.values())
        painted = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint16)
        for name, value in labels.items():
            path = entry.label / f"{name}{MASK_SUFFIX}"
            if value in wanted and value > 0 and path.is_file():
                mask = _on_image_grid(path, entry, image)  # held: a view of a temporary image reads freed memory
                painted[sitk.GetArrayViewFromImage(mask) > 0] = value
        label = sitk.GetImageFromArray(painted)
        label.CopyInformation(image)
        return label
    return _on_image_grid(entry.label, entry, image)


def _on_image_grid(path: Path, entry: CaseEntry, image: sitk.Image) -> sitk.Image:
    """The label map (or mask) at ``path``, read and checked against ``image``'s grid."""
    _check_complete(path)  # ITK pads a truncated NIfTI with zeros: background where organs were
    try:
        label = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot be read as a label map ({_first_line(exc)}).") from exc
    if label.GetDimension() == 4 and label.GetSize()[3] == 1:
        label = label[:, :, :, 0]
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: a label map has one value per voxel, this one {label.GetNumberOfComponentsPerPixel()}.")
    problem = grid_mismatch(label, image)
    if problem and label.GetDimension() == 3:
        # The same grid stored in another axis order (one file reoriented, e.g. to RAS): permuting and
        # flipping the label's axes is exact, no resampling.
        orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        turned = sitk.DICOMOrient(label, orientation)
        if grid_mismatch(turned, image) is None:
            log.info("%s: stored in another axis order than its image; reoriented to %s", path, orientation)
            label, problem = turned, None
    if problem:
        raise InputError(f"{path}: {problem} of its image {entry.image.name}; a label map must lie on its image's "
                         "grid (nnU-Net convention): resample it onto the image first.")
    return label


def grid_mismatch(image: sitk.Image, reference: sitk.Image) -> str | None:
    """How ``image``'s grid differs from ``reference``'s, or None. The tolerances (origin within a
    hundredth of a voxel, spacing within 1e-4 of itself, direction within 1e-4) absorb the float32
    rounding of NIfTI headers and of tools that rewrite them, not a shift that moves a mask."""
    size, ref_size = image.GetSize(), reference.GetSize()
    if size != ref_size:
        return f"its size {'x'.join(map(str, size))} is not the {'x'.join(map(str, ref_size))}"
    spacing = np.array(reference.GetSpacing())
    if not np.allclose(image.GetSpacing(), spacing, rtol=1e-4, atol=0.0):
        return f"its spacing {tuple(round(s, 4) for s in image.GetSpacing())} mm is not the {tuple(round(s, 4) for s in spacing)} mm"
    if np.abs(np.subtract(image.GetOrigin(), reference.GetOrigin())).max() > 1e-2 * spacing.min():
        return (f"its origin {tuple(round(s, 2) for s in image.GetOrigin())} mm is not the "
                f"{tuple(round(s, 2) for s in reference.GetOrigin())} mm")
    if not np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-4):
        return "its direction (orientation) is not the one"
    return None
