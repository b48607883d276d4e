"""Shared by the robustness-dataset scripts (crop_dataset_fov, resample_dataset, scale_dataset_body,
deform_dataset_anatomy, enhance_dataset_contrast, add_body_fat, add_oral_contrast): their command line, and the copy of an
nnU-Net-style dataset with every scan and label transformed."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterator

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


def label_values(src: Path) -> dict[str, int]:
    """``dataset.json``'s label names and their values."""
    labels = json.loads((src / "dataset.json").read_text(encoding="utf-8"))["labels"]
    return {k: int(v) for k, v in labels.items()}


def case_files(src: Path) -> Iterator[tuple[str, Path, Path]]:
    """(case, scan, label map) of each labelled case of ``src``, its first channel's scan."""
    for lf in sorted((src / "labelsTr").glob("*.nii*")):
        case = lf.name.split(".nii")[0]
        for im in sorted((src / "imagesTr").glob(f"{case}_0000.nii*")):
            yield case, im, lf


def open_copy(a: argparse.Namespace, prog: str) -> tuple[Path, Path, dict[str, int]] | None:
    """The source and output folders of ``a`` (copy_parser's) and the source's label values; None after a
    one-line error where the source has no dataset.json or the output folder already holds something."""
    src, dst = Path(a.dataset), Path(a.output)
    if not (src / "dataset.json").is_file():
        print(f"{prog}: {src} is not a dataset (no dataset.json)", file=sys.stderr)
        return None
    if dst.exists() and any(dst.iterdir()):
        print(f"{prog}: {dst} exists and is not empty; give a new folder", file=sys.stderr)
        return None
    return src, dst, label_values(src)
