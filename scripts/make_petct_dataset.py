#!/usr/bin/env python3
"""Build an nnU-Net-style dataset of a second CT person from PyPI: the DICOM series and organ labels
that TotalSegmentator's source package ships as test files (tests/reference_files/example_ct_dicom,
example_seg_dicom.nii.gz; Apache-2.0). It is an upper-abdomen slab, 40 mm, of a contrast-enhanced
low-dose CT from a PET/CT (Siemens Biograph mCT, 2022, 0.98 x 0.98 mm, 2 mm apart, 500 mm field of
view, arms at the sides): another person, scanner, resolution and phase than ../shared/data/ct-abdomen.
Its labels are TotalSegmentator's --fast predictions, as the shared data's are, not manual outlines.
The scan is read with the engine's DICOM reader and written as int16 Hounsfield units; the label map
is copied byte for byte (stored in another axis order; evaluate reorients it exactly); dataset.json's
names are TotalSegmentator's "total" classes, read from the same package.

example:
  python scripts/make_petct_dataset.py runs/generalisation/ct-other-person-petct
  python scripts/make_petct_dataset.py runs/generalisation/ct-other-person-petct --sdist totalsegmentator-2.18.0.tar.gz
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import SimpleITK as sitk

from progidiff.errors import InputError
from progidiff.volume import read_scan

#: The package release whose test files these are, and its source archive's sha256 (PyPI's).
RELEASE = "2.18.0"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
CASE = "tspetct_001"
REF = "tests/reference_files/"
DESCRIPTION = ("One real contrast-enhanced low-dose CT from a PET/CT (Siemens Biograph mCT, 2022), a 40 mm "
               "upper-abdomen slab at 0.98 x 0.98 x 2 mm, arms at the sides: another person than ct-abdomen. Labels: "
               "TotalSegmentator --fast predictions (not manual). Test files of the TotalSegmentator package "
               f"{RELEASE} (Apache-2.0), made by scripts/make_petct_dataset.py")


def download_sdist(folder: Path) -> Path:
    """TotalSegmentator's source archive, through pip (the wheel has no test files)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"totalsegmentator=={RELEASE}", "-d", str(folder)], check=True)
    return next(p for p in folder.iterdir() if p.name.lower().endswith(".tar.gz"))


def total_classes(map_to_binary: str) -> dict[int, str]:
    """TotalSegmentator's "total" task: label value -> structure name, read from its map_to_binary.py
    without importing the package (which needs nnU-Net and its weights)."""
    for node in ast.parse(map_to_binary).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            for key, value in zip(node.value.keys, node.value.values):
                if key is not None and ast.literal_eval(key) == "total":
                    return ast.literal_eval(value)
    raise InputError("map_to_binary.py: no class_map['total']; is this a TotalSegmentator source archive?")


def build(sdist: Path, out: Path, check_hash: bool = True) -> Path:
    """Write ``out/imagesTr``, ``out/labelsTr``, ``out/dataset.json`` and the package's LICENSE from the
    source archive ``sdist``."""
    if check_hash:
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise InputError(f"{sdist}: sha256 {digest}, not that of totalsegmentator {RELEASE}'s source archive.")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: exists and is not empty; give a new folder.")
    # written beside it and moved into place whole: a failed run leaves no half-made dataset behind
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(staged, 0o755)  # mkdtemp makes it 0700
    try:
        _write(sdist, staged)
        if out.exists():
            out.rmdir()
        os.replace(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out


def _write(sdist: Path, ds: Path) -> None:
    """The dataset's files, from the archive, into the folder ``ds``."""
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split("/")[0]
        wanted = [m for m in tar.getmembers()
                  if m.isfile() and m.name.startswith((f"{root}/{REF}example_ct_dicom/", f"{root}/{REF}example_seg_dicom.nii.gz",
                                                       f"{root}/totalsegmentator/map_to_binary.py", f"{root}/LICENSE"))]
        # the "data" filter (refuse links and paths outside tmp) where this Python has it (3.9.17+, 3.11.4+)
        tar.extractall(tmp, members=wanted, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        src = Path(tmp) / root
        if not (src / REF / "example_ct_dicom").is_dir() or not (src / REF / "example_seg_dicom.nii.gz").is_file():
            raise InputError(f"{sdist}: has no {REF}example_ct_dicom/ and example_seg_dicom.nii.gz.")
        classes = total_classes((src / "totalsegmentator" / "map_to_binary.py").read_text(encoding="utf-8"))
        scan = read_scan(src / REF / "example_ct_dicom")
        for sub in ("imagesTr", "labelsTr"):
            (ds / sub).mkdir(parents=True, exist_ok=True)
        # DICOM stores integers (here slope 1, intercept -1024): int16 holds every value exactly
        sitk.WriteImage(sitk.Cast(sitk.Round(scan.image), sitk.sitkInt16), str(ds / "imagesTr" / f"{CASE}_0000.nii.gz"))
        (ds / "labelsTr" / f"{CASE}.nii.gz").write_bytes((src / REF / "example_seg_dicom.nii.gz").read_bytes())
        if (src / "LICENSE").is_file():
            (ds / "LICENSE-TotalSegmentator.txt").write_bytes((src / "LICENSE").read_bytes())
    meta = {"name": "ts-petct", "description": DESCRIPTION, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
            "numTraining": 1, "licence": "Apache-2.0 (TotalSegmentator repository test files); see LICENSE-TotalSegmentator.txt",
            "labels": {"background": 0, **{name: int(value) for value, name in sorted(classes.items())}}}
    (ds / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parts = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description=parts[0], epilog=parts[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", type=Path, help="the dataset folder to write")
    p.add_argument("--sdist", type=Path, help=f"totalsegmentator-{RELEASE}.tar.gz already downloaded (else pip fetches it)")
    args = p.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sdist = args.sdist or download_sdist(Path(tmp))
            build(sdist, args.output)
    except (InputError, subprocess.CalledProcessError, OSError, tarfile.TarError) as exc:
        print(f"make_petct_dataset: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output}: {CASE} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
