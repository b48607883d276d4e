"""Writing the output contract of ``progidiff segment`` atomically.

Every file is written into a temporary sibling folder first; only when all are complete
are they moved into OUTDIR (each move an atomic rename on the same file system). On any
error or interrupt the temporary folder is removed and OUTDIR is as it was.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import OutputError

log = logging.getLogger(__name__)

CONTRACT_FILES = ("consensus.nii.gz", "uncertainty.nii.gz", "proposals.seg.nrrd", "report.json", "overview.png")
REPORT_KEYS = ("prompt", "organ", "similarity", "modality", "model", "device", "seeds", "steps", "seconds",
               "proposals", "agreement", "review")


def proposal_name(k: int) -> str:
    return f"proposal_{k:02d}.nii.gz"


def check_output_dir(outdir: Path, overwrite: bool) -> None:
    """Refuse early (before any sampling) an output folder we could not or should not fill."""
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"{outdir}: exists and is not a folder; choose another -o.")
    if outdir.is_dir():
        existing = [p.name for p in outdir.iterdir() if p.name in CONTRACT_FILES or p.name.startswith("proposal_")]
        if existing and not overwrite:
            raise OutputError(f"{outdir}: already holds results ({', '.join(sorted(existing)[:3])}…); "
                              "use --overwrite or another -o.")
    parent = outdir if outdir.is_dir() else outdir.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: not writable; choose an output folder you can write to.")


@contextlib.contextmanager
def staging(outdir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success move its files into ``outdir``."""
    check_output_dir(outdir, overwrite)
    outdir_parent = outdir.parent
    outdir_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.tmp-", dir=outdir_parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result folder should get the usual mode
    created = not outdir.exists()
    try:
        yield tmp
        if created:
            os.replace(tmp, outdir)
        else:
            if overwrite:
                for p in outdir.iterdir():
                    if p.is_file() and (p.name in CONTRACT_FILES or p.name.startswith("proposal_")):
                        p.unlink()
            for p in sorted(tmp.iterdir()):
                os.replace(p, outdir / p.name)
            tmp.rmdir()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_mask(mask: np.ndarray, like: sitk.Image, path: Path, dtype=sitk.sitkUInt8) -> None:
    img = sitk.GetImageFromArray(mask.astype(np.uint8) if dtype == sitk.sitkUInt8 else mask.astype(np.float32))
    img.CopyInformation(like)
    sitk.WriteImage(img, str(path), useCompression=True)


def write_seg_nrrd(masks: np.ndarray, like: sitk.Image, path: Path, names: list[str],
                   color: tuple[int, int, int], terminology: str) -> None:
    """A 3D Slicer segmentation file: one segment per proposal, each on its own layer
    (proposals overlap), as Slicer's vtkMRMLSegmentationStorageNode writes it."""
    import nrrd

    from .proposals import bounding_box

    n = masks.shape[0]
    # The file runs proposal fastest, then x, y, z: NRRD's (N, X, Y, Z) in Fortran order, which is
    # (Z, Y, X, N) in C order. Interleaving only the box that holds a voxel and writing that C
    # array once took a 512x512x200 liver's file from 9.8 s to 1.0 s on 2 CPU cores (two full
    # transposes before: ours to (N, X, Y, Z), then pynrrd's back to Fortran order).
    box = bounding_box(masks.any(0))
    data = np.zeros(masks.shape[1:] + (n,), np.uint8)
    data[box] = masks[(slice(None),) + box].transpose(1, 2, 3, 0)
    d = np.array(like.GetDirection()).reshape(3, 3)
    sp = np.array(like.GetSpacing())
    dirs = np.vstack([np.full(3, np.nan), (d * sp[None, :]).T])
    size = like.GetSize()
    header = {
        "type": "unsigned char", "dimension": 4, "space": "left-posterior-superior",
        "space directions": dirs, "kinds": ["list", "domain", "domain", "domain"],
        "space origin": np.array(like.GetOrigin()), "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    rgb = " ".join(f"{c / 255:.6f}" for c in color)
    extent = f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}"
    for i in range(n):
        header.update({
            f"Segment{i}_ID": f"proposal_{i + 1:02d}", f"Segment{i}_Name": names[i],
            f"Segment{i}_NameAutoGenerated": "0", f"Segment{i}_Color": rgb, f"Segment{i}_ColorAutoGenerated": "0",
            f"Segment{i}_Layer": str(i), f"Segment{i}_LabelValue": "1", f"Segment{i}_Extent": extent,
            f"Segment{i}_Tags": f"TerminologyEntry:{terminology}|",
        })
    # gzip level 1: 0.36 s and 2.4 MB for that liver, against pynrrd's default 9: 1.5 s and 0.63 MB.
    nrrd.write(str(path), data, header, index_order="C", compression_level=1)


def write_report(report: dict, path: Path) -> None:
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:  # a programming error, never a user's
        raise AssertionError(f"report lacks {missing}")
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
