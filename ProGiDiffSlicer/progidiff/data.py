"""Labelled cases prepared on the model grid, and the training-slice pipeline (balanced sampling +
MONAI dictionary augmentation). Reading datasets from disk: datasets.py; what label names hold:
label_names.py (both re-exported here).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .configs import BODY_SCALE  # defined with TrainConfig, which defaults to it
from .datasets import CaseEntry, DatasetInfo, grid_mismatch, read_dataset, read_label  # noqa: F401 (re-exported)
from .errors import InputError
from .label_names import (dataset_organs, label_organs, lesions_counted, organ_label_values,  # noqa: F401 (re-exported)
                          organ_mask)
from .prompts import Vocabulary
from .volume import (CT_WINDOW, GridSpec, body_axis_coords, body_slices, context_slices, guess_modality,
                     label_to_model_grid, on_model_grid, read_scan)

log = logging.getLogger(__name__)


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
        label_img = read_label(entry, scan.image, labels, {v for o in organs for v in organ_label_values(labels, vocab, o)})
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


#: Focal liver lesion augmentation: lesions per slice stack (least, most), their diameters (mm) and their
#: density against the liver around them (HU). Metastases, the commonest finding of oncological CT, read
#: 20-70 HU below a portal-venous liver, cysts lower still. Trained without them, the shipped model cut a
#: liver with five 10-30 mm lesions 50 HU darker along their line: Dice 0.730 on its held-out slab against
#: 0.864 without them (docs/evaluation/liver-lesions).
LESION_COUNT = (1, 6)
LESION_DIAMETER_MM = (8.0, 40.0)
LESION_HU = (-80.0, -20.0)


def liver_lesion_gain(masks: dict[str, np.ndarray], rng: np.random.Generator,
                      spacing_xyz: Sequence[float]) -> np.ndarray | None:
    """Random round lesions in the liver as a gain (in HU) over ``masks``' grid (a stack of slices
    ``spacing_xyz`` mm apart): balls centred on liver voxels, kept inside the liver, each with its own
    density. The labels stay: a lesion is part of the liver, as reference masks count it."""
    liver = masks.get("liver")
    if liver is None or not liver.any():
        return None
    spacing = np.asarray(spacing_xyz, float)[::-1]                    # z, y, x as the stack is
    where = np.flatnonzero(liver)
    grid = [(np.arange(n) * s)[tuple(slice(None) if a == k else None for a in range(3))]
            for k, (n, s) in enumerate(zip(liver.shape, spacing))]
    gain = np.zeros(liver.shape, np.float32)
    for _ in range(rng.integers(LESION_COUNT[0], LESION_COUNT[1] + 1)):
        centre = np.array(np.unravel_index(where[rng.integers(where.size)], liver.shape)) * spacing
        radius = rng.uniform(*LESION_DIAMETER_MM) / 2
        ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2
        gain[ball] = np.float32(rng.uniform(*LESION_HU))
    return gain * liver


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
                 fatty_liver: float = 0.0, liver_lesions: float = 0.0) -> None:
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
        #: Share of CT slices given focal liver lesions (liver_lesion_gain), from the case's labels.
        self.liver_lesions = liver_lesions if augment else 0.0
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
        the slices, a random contrast phase, a fatty liver and liver lesions, organ by organ from the labels.
        Each from a random stream of its own: a run without one draws the rest as before."""
        idx = np.clip(z + np.arange(-self.context, self.context + 1), 0, len(case.z_world) - 1)
        masks = {o: m[idx] for o, m in case.masks.items()}
        lesions = partial(liver_lesion_gain, spacing_xyz=case.grid.GetSpacing())
        gains = []
        for share, gain_of, stream in ((self.contrast_phase, contrast_gain, 1), (self.fatty_liver, fatty_liver_gain, 3),
                                       (self.liver_lesions, lesions, 4)):
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
        if (self.contrast_phase > 0 or self.fatty_liver > 0 or self.liver_lesions > 0) and case.modality == "CT":
            item["image"] = self._changed(case, z, item["image"], i)
        if self.transform is not None:
            self.transform.set_random_state(seed=int(rng.integers(2**31)))
            item = self.transform(item)
        image = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32).clamp(0, 1)
        label = (torch.as_tensor(np.asarray(item["label"]), dtype=torch.float32) > 0.5).float()
        coord = float(case.coords[z]) if case.coords is not None else 0.5
        return {"image": image, "label": label, "organ": self.organs.index(organ),
                "phrase": int(rng.integers(1 << 30)), "coord": torch.tensor(coord, dtype=torch.float32)}
