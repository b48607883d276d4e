"""Shared by the robustness-dataset scripts (crop_dataset_fov, resample_dataset, scale_dataset_body,
deform_dataset_anatomy, enhance_dataset_contrast, add_body_fat, add_oral_contrast): their command line, and the copy of an
nnU-Net-style dataset with every scan and label transformed."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Callable

import SimpleITK as sitk


def copy_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every copying script starts from: its docstring's first paragraph as the
    description, the second (the example) as the epilog, and the source and output dataset folders."""
    parts = doc.split("\n\n")
    p = argparse.ArgumentParser(description=parts[0], epilog=parts[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset")
    p.add_argument("output")
    return p


def copy_dataset(src: Path, dst: Path, transform: Callable[[sitk.Image, bool], sitk.Image]) -> None:
    """Write ``transform(image, is_label)`` of every ``imagesTr``/``labelsTr`` NIfTI of ``src``
    under the same name in ``dst``, and copy ``dataset.json`` (see copy_dataset_json)."""
    for sub, label in (("imagesTr", False), ("labelsTr", True)):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / sub).glob("*.nii*")):
            sitk.WriteImage(transform(sitk.ReadImage(str(f)), label), str(dst / sub / f.name))
    copy_dataset_json(src, dst)


def copy_dataset_json(src: Path, dst: Path) -> None:
    """Copy ``dataset.json`` with the command that made the copy added to its description: `progidiff
    evaluate` repeats the description in its report and the model card, which would otherwise call a
    resampled or warped copy "one real abdominal CT scan at 3 mm"."""
    meta = json.loads((src / "dataset.json").read_text(encoding="utf-8"))
    made_by = shlex.join(["python", *sys.argv])
    meta["description"] = (f"{meta.get('description', src.name)}. This copy was made by `{made_by}`: "
                           "not the scan as acquired")
    (dst / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
