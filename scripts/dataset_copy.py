"""Shared by the robustness-dataset scripts (crop_dataset_fov, resample_dataset,
scale_dataset_body, deform_dataset_anatomy): copy an nnU-Net-style dataset with every scan and
label transformed."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import SimpleITK as sitk


def copy_dataset(src: Path, dst: Path, transform: Callable[[sitk.Image, bool], sitk.Image]) -> None:
    """Write ``transform(image, is_label)`` of every ``imagesTr``/``labelsTr`` NIfTI of ``src``
    under the same name in ``dst``, and copy ``dataset.json``."""
    for sub, label in (("imagesTr", False), ("labelsTr", True)):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / sub).glob("*.nii*")):
            sitk.WriteImage(transform(sitk.ReadImage(str(f)), label), str(dst / sub / f.name))
    shutil.copy(src / "dataset.json", dst / "dataset.json")
