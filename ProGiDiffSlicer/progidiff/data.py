"""Datasets in the nnU-Net / MSD convention, prepared on the model grid, and the
training-slice pipeline (balanced sampling + MONAI dictionary augmentation).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .prompts import Vocabulary, label_key
from .volume import (CT_WINDOW, IMAGE_SUFFIXES, GridSpec, _check_complete, _first_line, body_axis_coords, body_centre,
                     body_slices, context_slices, guess_modality, label_to_model_grid, on_model_grid, read_scan)

log = logging.getLogger(__name__)


@dataclass
class CaseEntry:
    name: str
    image: Path
    label: Path | None


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
    ``root`` is the dataset's folder or its JSON file, when that is not named dataset.json."""
    r = Path(root)
    meta_path = r / "dataset.json"
    if r.suffix.lower() == ".json" and r.is_file():  # a dataset file of another name: MONAI's BTCV "dataset_0.json"
        r, meta_path = r.parent, r
    if not meta_path.is_file():
        raise InputError(f"{r}: no dataset.json; a dataset folder holds imagesTr/, labelsTr/ and dataset.json (nnU-Net convention).")
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


def _case_name(path: Path) -> str:
    name = path.name
    for ending in IMAGE_SUFFIXES:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return path.stem


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
        cases.append(CaseEntry(_case_name(paths[0]), paths[0], paths[1] if len(paths) > 1 else None))
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
        cases.append(CaseEntry(_case_name(img), img, lab if lab.is_file() else None))
    if not cases:
        raise InputError(f"{root / 'imagesTr'}: no images (CASE_0000{ending or '.nii.gz'} as nnU-Net names them, or "
                         'listed in dataset.json\'s "training" as MSD does).')
    return cases


def read_label(entry: CaseEntry, image: sitk.Image) -> sitk.Image:
    """The case's label map, refused unless it lies on the grid of ``image`` (its scan, as read):
    the nnU-Net convention, and what every voxel-wise use of it assumes. A label cropped or shifted
    against its scan would otherwise train or score background where the organ is."""
    assert entry.label is not None
    _check_complete(entry.label)  # ITK pads a truncated NIfTI with zeros: background where organs were
    try:
        label = sitk.ReadImage(str(entry.label))
    except RuntimeError as exc:
        raise InputError(f"{entry.label}: cannot be read as a label map ({_first_line(exc)}).") from exc
    if label.GetDimension() == 4 and label.GetSize()[3] == 1:
        label = label[:, :, :, 0]
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{entry.label}: a label map has one value per voxel, this one {label.GetNumberOfComponentsPerPixel()}.")
    problem = grid_mismatch(label, image)
    if problem and label.GetDimension() == 3:
        # The same grid stored in another axis order (one file reoriented, e.g. to RAS): permuting and
        # flipping the label's axes is exact, no resampling.
        orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        turned = sitk.DICOMOrient(label, orientation)
        if grid_mismatch(turned, image) is None:
            log.info("%s: stored in another axis order than its image; reoriented to %s", entry.label, orientation)
            label, problem = turned, None
    if problem:
        raise InputError(f"{entry.label}: {problem} of its image {entry.image.name}; a label map must lie on its image's "
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


@dataclass
class PreparedCase:
    """One scan on the model grid: image (Z, H, W) in [0, 1], one mask per organ, world z per slice
    and body-axis coordinate per slice (anatomical guidance); and the world z of the scan's own
    slices (the few-shot slab of ``adapt`` is cut on them).

    It keeps nothing at the scan's resolution: train prepares every case before it starts, and a
    512x512x200 CT with its label map held 254 MB each (measured), so a 100-case cohort would not
    have fitted in 24 GB; on the model grid a case is about 1 MB."""

    name: str
    modality: str
    image: np.ndarray
    masks: dict[str, np.ndarray]
    z_world: np.ndarray
    grid: sitk.Image = field(repr=False)
    scan_z_mm: np.ndarray = field(repr=False)
    coords: np.ndarray | None = None


def prepare_case(entry: CaseEntry, labels: dict[str, int], vocab: Vocabulary, grid: GridSpec,
                 organs: Sequence[str], modality: str | None = None) -> PreparedCase:
    scan = read_scan(entry.image)
    mod = modality or guess_modality(scan)[0]
    ref, image = on_model_grid(scan.image, grid, mod)
    masks: dict[str, np.ndarray] = {}
    if entry.label is not None:
        label_img = read_label(entry, scan.image)
        lab_arr = sitk.GetArrayViewFromImage(label_img)
        for organ in organs:
            if not organ_label_values(labels, vocab, organ):
                continue
            binary = sitk.GetImageFromArray(organ_mask(lab_arr, scan.image, labels, vocab, organ, mod).astype(np.uint8))
            binary.CopyInformation(label_img)
            masks[organ] = label_to_model_grid(binary, ref)
    z0, sz, nz = ref.GetOrigin()[2], ref.GetSpacing()[2], ref.GetSize()[2]
    size = scan.image.GetSize()
    scan_z = np.array([scan.image.TransformIndexToPhysicalPoint((size[0] // 2, size[1] // 2, k))[2] for k in range(size[2])])
    return PreparedCase(entry.name, mod, image, masks, z0 + sz * np.arange(nz), ref, scan_z, body_axis_coords(image))


#: Label names of public datasets that are neither a name nor a synonym of the vocabulary's organs.
DATASET_LABEL_ALIASES = {
    "rkid": "kidney_right", "lkid": "kidney_left", "gall": "gallbladder", "sto": "stomach",  # MONAI's BTCV dataset_0.json
    "postcava": "inferior_vena_cava", "arota": "aorta",  # AMOS 2022's dataset.json (its spelling of the aorta)
}
#: One label for both sides (AbdomenCT-1K's and KiTS's "kidney"): split at the body's midline into the
#: vocabulary's left and right organ (organ_mask).
BILATERAL = {"kidney": ("kidney_left", "kidney_right"), "kidneys": ("kidney_left", "kidney_right")}
#: A label with one of these as its last word is a lesion ("cancer" in MSD's liver and pancreas tasks, "liver
#: tumor"). It lies in its organ, and an organ's segmentation (volumetry, the Segment Editor's) holds its lesions,
#: so its voxels are the organ's; left out, they would teach the model holes where tumours are.
LESION_WORDS = {"tumor", "tumour", "tumors", "tumours", "cancer", "lesion", "lesions", "mass", "masses",
                "metastasis", "metastases", "cyst", "cysts"}


def _organs_named(name: str, vocabulary: Vocabulary) -> tuple[str, ...]:
    """The organs a label name names: a vocabulary name or synonym, a public dataset's alias, or both sides."""
    known = set(vocabulary.names())
    if (o := vocabulary.organ_for_label_name(name)) is not None:
        return (o.name,)
    key = label_key(name)
    return tuple(o for o in ((DATASET_LABEL_ALIASES[key],) if key in DATASET_LABEL_ALIASES else BILATERAL.get(key, ()))
                 if o in known)


class LabelRole(NamedTuple):
    organs: tuple[str, ...]  # the organs whose voxels the label holds
    lesion: bool             # a lesion of them
    both_sides: bool         # one label for a left and a right organ: organ_mask splits it


def label_organs(labels: dict[str, int], vocabulary: Vocabulary) -> dict[str, LabelRole]:
    """For each label name, what it holds (LabelRole).

    A lesion counts for its organ only where the dataset labels that organ too: an unqualified "cancer"
    for the organ of the dataset's one organ label (MSD's tasks; KiTS's "tumor" for its "kidney", both
    sides), "liver tumor" for the liver."""
    out = {n: LabelRole(_organs_named(n, vocabulary), False, label_key(n) in BILATERAL) for n in labels}
    hosts = [role for role in out.values() if role.organs]
    named = {o for role in hosts for o in role.organs}
    for n in labels:
        words = label_key(n).split()
        if out[n].organs or not words or words[-1] not in LESION_WORDS:
            continue
        if len(words) > 1:
            rest = " ".join(words[:-1])
            host = LabelRole(_organs_named(rest, vocabulary), True, rest in BILATERAL)
        else:
            host = hosts[0] if len(hosts) == 1 else LabelRole((), True, False)
        out[n] = LabelRole(tuple(o for o in host.organs if o in named), True, host.both_sides)
    return out


def organ_label_values(labels: dict[str, int], vocabulary: Vocabulary, organ: str) -> list[int]:
    """The dataset's label values that hold ``organ`` (a vocabulary name): its names, synonyms and aliases
    (two names may name one organ), a label of both sides, and its lesions (label_organs)."""
    return [labels[n] for n, role in label_organs(labels, vocabulary).items() if organ in role.organs]


def lesions_counted(labels: dict[str, int], vocabulary: Vocabulary) -> dict[str, tuple[str, ...]]:
    """Lesion labels whose voxels count as their organ's, for the log: train and evaluate say so."""
    return {n: role.organs for n, role in label_organs(labels, vocabulary).items() if role.lesion and role.organs}


def organ_mask(label: np.ndarray, image: sitk.Image, labels: dict[str, int], vocabulary: Vocabulary, organ: str,
               modality: str) -> np.ndarray:
    """``organ``'s voxels in ``label`` (a label array on ``image``'s grid, z y x). A label of both sides gives
    the side's half: patient-left is world +x (ITK's LPS), split at the body's centre of mass, which lies on
    the spine to within a few centimetres while the kidneys lie 4-8 cm either side of it."""
    roles = {n: role for n, role in label_organs(labels, vocabulary).items() if organ in role.organs}
    mask = np.isin(label, [labels[n] for n in roles])
    both = [labels[n] for n, role in roles.items() if role.both_sides]
    if both:
        side = next(i for names in BILATERAL.values() for i, o in enumerate(names) if o == organ)  # 0 left, 1 right
        midline = body_centre(image, modality)[0]
        size, sp, d = image.GetSize(), image.GetSpacing(), np.array(image.GetDirection()).reshape(3, 3)
        # world x of the voxels of slice 0 (y, x), then slice by slice: a full-volume array of
        # coordinates would be 2 GB for a 512 x 512 x 987 liver CT (MSD's largest)
        x0 = (image.GetOrigin()[0] + d[0, 0] * sp[0] * np.arange(size[0])[None, :]
              + d[0, 1] * sp[1] * np.arange(size[1])[:, None])
        two_sided = np.isin(label, both)
        for k in np.nonzero(two_sided.any(axis=(1, 2)))[0]:
            x = x0 + d[0, 2] * sp[2] * k
            mask[k] &= ~(two_sided[k] & ((x <= midline) if side == 0 else (x > midline)))
    return mask


def dataset_organs(labels: dict[str, int], vocab: Vocabulary) -> list[str]:
    """The vocabulary's organs that the dataset's labels hold (not counting lesions), in vocabulary order."""
    named = {o for role in label_organs(labels, vocab).values() if not role.lesion for o in role.organs}
    return [o for o in vocab.names() if o in named]


def training_slices(case: PreparedCase, exclude_z: dict[str, list] | None = None) -> np.ndarray:
    """Indices of the case's slices that training may use: inside the body, outside any held-out slab."""
    ok = np.zeros(case.image.shape[0], bool)
    ok[body_slices(case.image)] = True
    for lo, hi in z_ranges((exclude_z or {}).get(case.name, [])):
        ok &= ~((case.z_world >= lo) & (case.z_world <= hi))
    return np.nonzero(ok)[0]


def untrainable_organs(cases: Sequence[PreparedCase], organs: Sequence[str], exclude_z: dict[str, list] | None = None) -> list[str]:
    """Organs that no training slice of any case holds: training would skip them and the model card
    would still claim them."""
    allowed = [training_slices(c, exclude_z) for c in cases]
    return [o for o in organs if not any(o in c.masks and c.masks[o][a].any() for c, a in zip(cases, allowed))]


def unseen_organ_ends(cases: Sequence[PreparedCase], organs: Sequence[str],
                      exclude_z: dict[str, list] | None = None) -> dict[str, list[str]]:
    """The ends of each organ that no training slice shows: ``{"liver": ["superior"]}`` when every
    case that holds the liver still holds it on its highest training slice (the field of view cuts it
    off there, so the model never saw where it ends). The model grid runs inferior -> superior.
    Organs seen whole in at least one case, or in none, are left out."""
    out: dict[str, list[str]] = {}
    allowed = [training_slices(c, exclude_z) for c in cases]
    for organ in organs:
        held = [(c.masks[organ], a) for c, a in zip(cases, allowed) if organ in c.masks and len(a) and c.masks[organ][a].any()]
        if not held:
            continue
        ends = [end for end, k in (("inferior", 0), ("superior", -1)) if all(m[a[k]].any() for m, a in held)]
        if ends:
            out[organ] = ends
    return out


#: Default range of the body-size augmentation: the slice's content drawn 0.8x to 1.33x as large.
BODY_SCALE = (0.8, 4 / 3)

#: Contrast-phase augmentation: HU each organ gains over an unenhanced scan in a portal-venous phase
#: (typical adult values; scripts/enhance_dataset_contrast.py makes its test presentation from the same
#: table, so that presentation cannot tell whether the table is right for real scans), and how much of it
#: an arterial phase keeps (the aorta more than doubles, the veins and liver barely enhance yet).
#: Organs missing here (gallbladder, stomach: bile and contents) never enhance.
CONTRAST_GAIN_HU = {"aorta": 120.0, "inferior_vena_cava": 90.0, "kidney_left": 120.0, "kidney_right": 120.0,
                    "spleen": 70.0, "pancreas": 60.0, "liver": 55.0}
ARTERIAL_FACTOR = {"aorta": 2.5, "inferior_vena_cava": 0.2, "liver": 0.3}


def contrast_gain(masks: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray | None:
    """A random contrast phase as a gain (in HU) over ``masks``' grid: a bolus strength (0.2 to
    1.3 times the table), a phase between portal-venous and arterial, each organ jittered by ±20 %. Made
    from the labels because no global intensity change turns an unenhanced aorta (41 HU on the
    sample CT, the liver's 46) into an enhanced one (150-300 HU, the liver's 100): `ct-v12`, shipped
    before and trained without it, found no aorta or IVC on a portal-venous version of its held-out slab."""
    known = [o for o in masks if o in CONTRAST_GAIN_HU]
    if not known:
        return None
    bolus, arterial = rng.uniform(0.2, 1.3), rng.uniform(0.0, 1.0)
    gain = np.zeros(next(iter(masks.values())).shape, np.float32)
    for o in known:
        phase = 1.0 + arterial * (ARTERIAL_FACTOR.get(o, 1.0) - 1.0)
        gain += masks[o] * np.float32(CONTRAST_GAIN_HU[o] * bolus * phase * rng.uniform(0.8, 1.2))
    return gain


#: Fatty-liver augmentation: HU a fatty liver loses (least, most). Steatosis, the commonest diffuse
#: liver disease (about a quarter of adults), lowers an unenhanced liver from 50-65 HU to 40 and below,
#: under the spleen, down to 0 or less when severe; the sample CT's liver reads 46 HU. The shipped
#: model trained without it found 0.796 of a liver 40 HU lower on its held-out slab against 0.884
#: (README, *Fatty liver*).
FATTY_LIVER_HU = (10.0, 60.0)


def fatty_liver_gain(masks: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray | None:
    """A random fatty liver as a gain (negative, in HU) over ``masks``' grid, uniform over the liver."""
    if "liver" not in masks:
        return None
    return masks["liver"].astype(np.float32) * np.float32(-rng.uniform(*FATTY_LIVER_HU))


#: Smooth elastic warp: probability, and the magnitude range of MONAI's Rand2DElastic (control points
#: 16 px apart): tissue moves 7.8 mm on average on the 6 mm grid, up to 31 mm (measured over 40 draws).
#: Twice as far (1.5-3.0) at probability 0.5 lowered the liver on another body and lost the stomach:
#: docs/evaluation/elastic-warp.
ELASTIC = (0.2, 0.5, 1.5)


def augmentation(keys: tuple[str, str] = ("image", "label"), strong: bool = True,
                 body_scale: tuple[float, float] = BODY_SCALE):
    """MONAI dictionary transforms that make one body look like others.

    Spatial: rotation ±15°, scale (body size: the content drawn ``body_scale`` times as large,
    each in-plane axis on its own), shift ±8 px (crop/field of view),
    elastic deformation. Intensity: contrast (gamma), scale/shift (window, contrast
    phase), blur and low-resolution simulation (slice thickness, reconstruction kernel),
    noise, and a bias field (MR inhomogeneity). No left-right flip: the vocabulary has
    left and right organs.
    """
    from monai import transforms as T

    img, lab = keys
    p = 1.0 if strong else 0.5
    # RandAffine's scale factor s samples the input at s times the output's coordinates, so the
    # content appears 1/s as large; the range is given in MONAI's form, s - 1.
    lo, hi = body_scale
    scale = (1.0 / hi - 1.0, 1.0 / lo - 1.0)
    return T.Compose([
        T.RandAffined(keys=[img, lab], prob=0.9 * p, rotate_range=(0.26,), scale_range=(scale, scale),
                      translate_range=(8, 8), mode=("bilinear", "nearest"), padding_mode="zeros"),
        T.Rand2DElasticd(keys=[img, lab], prob=ELASTIC[0] * p, spacing=(16, 16), magnitude_range=ELASTIC[1:],
                         mode=("bilinear", "nearest"), padding_mode="zeros"),
        T.RandSimulateLowResolutiond(keys=[img], prob=0.2 * p, zoom_range=(0.5, 1.0), upsample_mode="bilinear"),
        T.RandGaussianSmoothd(keys=[img], prob=0.2 * p, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
        T.RandBiasFieldd(keys=[img], prob=0.2 * p, coeff_range=(0.0, 0.3)),
        T.RandAdjustContrastd(keys=[img], prob=0.3 * p, gamma=(0.7, 1.5)),
        T.RandScaleIntensityd(keys=[img], prob=0.5 * p, factors=0.15),
        T.RandShiftIntensityd(keys=[img], prob=0.5 * p, offsets=0.1),
        T.RandGaussianNoised(keys=[img], prob=0.3 * p, std=0.03),
    ])


def z_ranges(value) -> list[tuple[float, float]]:
    """Held-out slabs as a list of (lo, hi) mm; accepts one [lo, hi] pair or a list of pairs."""
    if not value:
        return []
    if isinstance(value[0], (int, float)):
        return [(float(value[0]), float(value[1]))]
    return [(float(a), float(b)) for a, b in value]


class SliceDataset(torch.utils.data.Dataset):
    """Random 2.5D training slices, balanced over organs, with organ-free slices mixed in.

    Item ``i`` is drawn from an RNG seeded by (seed, i), so a run is reproducible and
    ``--resume`` continues the same stream. ``multilabel``: the label is every organ's mask
    (O, H, W) in ``organs`` order (for the deterministic baseline), not the drawn organ's alone.
    """

    def __init__(self, cases: list[PreparedCase], organs: Sequence[str], context: int, length: int,
                 seed: int = 0, positive_fraction: float = 0.75, augment: bool = True,
                 exclude_z: dict[str, list[tuple[float, float]]] | None = None, multilabel: bool = False,
                 body_scale: tuple[float, float] = BODY_SCALE, contrast_phase: float = 0.0,
                 fatty_liver: float = 0.0) -> None:
        self.cases = cases
        self.multilabel = multilabel
        self.organs = list(organs)
        self.context = context
        self.length = length
        self.seed = seed
        self.positive_fraction = positive_fraction
        self.transform = augmentation(body_scale=body_scale) if augment else None
        #: Share of CT slices given a random contrast phase (contrast_gain), from the case's labels.
        self.contrast_phase = contrast_phase if augment else 0.0
        #: Share of CT slices whose liver is made fatty (fatty_liver_gain), from the case's labels.
        self.fatty_liver = fatty_liver if augment else 0.0
        self.stacks = [context_slices(c.image, context) for c in cases]
        self.allowed = [training_slices(c, exclude_z) for c in cases]
        #: For each organ, the cases whose training slices hold it. An item draws the organ first, then
        #: one of its cases: in a partly labelled cohort (one dataset's livers, another's spleens) each
        #: organ is drawn as often, however many cases label it.
        self.holders = {o: [ci for ci, c in enumerate(cases) if o in c.masks and c.masks[o][self.allowed[ci]].any()]
                        for o in self.organs}
        self.drawn = [o for o in self.organs if self.holders[o]]
        if not self.drawn:
            raise InputError("No training slice holds any of the requested organs; check --organs and the label names in dataset.json.")

    def __len__(self) -> int:
        return self.length

    def _changed(self, case: PreparedCase, z: int, stack: np.ndarray, seed: int) -> np.ndarray:
        """``stack`` (the slice and its neighbours, CT window in [0, 1]) given, each with its share of
        the slices, a random contrast phase and a fatty liver, organ by organ from the labels. Each from
        a random stream of its own: a run without one draws the rest as before."""
        idx = np.clip(z + np.arange(-self.context, self.context + 1), 0, len(case.z_world) - 1)
        masks = {o: m[idx] for o, m in case.masks.items()}
        gains = []
        for share, gain_of, stream in ((self.contrast_phase, contrast_gain, 1), (self.fatty_liver, fatty_liver_gain, 3)):
            rng = np.random.default_rng([self.seed, seed, stream])
            if share > 0 and rng.random() < share and (gain := gain_of(masks, rng)) is not None:
                gains.append(gain)
        if not gains:
            return stack
        from scipy.ndimage import gaussian_filter  # the partial volume at organ borders, in-plane

        lo, hi = CT_WINDOW
        gain = gaussian_filter(sum(gains), sigma=(0, 0.7, 0.7)) / (hi - lo)
        return np.clip(stack + gain, 0.0, 1.0).astype(np.float32)

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        organ = self.drawn[rng.integers(len(self.drawn))]
        holders = self.holders[organ]
        # the case from a stream of its own, so that one case draws exactly as before cases were drawn
        ci = holders[np.random.default_rng([self.seed, i, 2]).integers(len(holders))] if len(holders) > 1 else holders[0]
        case = self.cases[ci]
        allowed = self.allowed[ci]
        mask3d = case.masks[organ]
        if rng.random() < self.positive_fraction:
            zs = allowed[mask3d[allowed].reshape(len(allowed), -1).any(1)]
        else:
            zs = allowed
        z = int(zs[rng.integers(len(zs))])
        if self.multilabel:
            empty = np.zeros(mask3d.shape[1:], np.float32)
            label = np.stack([case.masks[o][z].astype(np.float32) if o in case.masks else empty for o in self.organs])
        else:
            label = mask3d[z][None].astype(np.float32)
        item = {"image": self.stacks[ci][z].copy(), "label": label}
        if (self.contrast_phase > 0 or self.fatty_liver > 0) and case.modality == "CT":
            item["image"] = self._changed(case, z, item["image"], i)
        if self.transform is not None:
            self.transform.set_random_state(seed=int(rng.integers(2**31)))
            item = self.transform(item)
        image = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32).clamp(0, 1)
        label = (torch.as_tensor(np.asarray(item["label"]), dtype=torch.float32) > 0.5).float()
        coord = float(case.coords[z]) if case.coords is not None else 0.5
        return {"image": image, "label": label, "organ": self.organs.index(organ),
                "phrase": int(rng.integers(1 << 30)), "coord": torch.tensor(coord, dtype=torch.float32)}
