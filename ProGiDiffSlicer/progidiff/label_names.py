"""What a dataset's label names hold: the vocabulary's organs by name, synonym or a public dataset's
own name, one label for both sides (split at the body's midline), and lesions that count as their organ."""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from .prompts import Vocabulary, label_key
from .volume import body_centre

log = logging.getLogger(__name__)


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


def log_lesions_counted(labels: dict[str, int], vocabulary: Vocabulary) -> None:
    """Say which lesion labels train and evaluate count as their organ's: it changes what is learnt and scored."""
    for lesion, hosts in lesions_counted(labels, vocabulary).items():
        log.info("label %r counted as part of %s (a lesion lies in its organ)", lesion, " and ".join(hosts))


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
