"""Writing the output contract of ``progidiff segment`` atomically.

Every file is written into a temporary sibling folder first; only when all are complete
are they moved into OUTDIR (each move an atomic rename on the same file system). On any
error or interrupt the temporary folder is removed and OUTDIR is as it was.
"""
from __future__ import annotations

import contextlib
import errno
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


#: errno values of a write that found no room (disk full, quota, file-size limit) or a read-only
#: file system: the user can fix them, so the CLI says so in one line instead of a traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


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
    arr = mask.astype(np.uint8) if dtype == sitk.sitkUInt8 else mask.astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(like)
    sitk.WriteImage(img, str(path), useCompression=True)
    if not nifti_gz_whole(path, arr.nbytes):
        # SimpleITK's NIfTI writer prints "wrote only 0 of N bytes" and returns: measured under a
        # file-size limit, a truncated mask would have been renamed into OUTDIR as a result.
        raise OSError(errno.ENOSPC, "written only in part (disk full or a file-size limit)", str(path))


@contextlib.contextmanager
def write_errors_as_os_errors(path: Path) -> Iterator[None]:
    """safetensors and torch.save report a failed write in their own exception types (``Error while
    serializing: I/O error: File too large (os error 27)``, ``unexpected pos 704 vs 598``, measured
    under a file-size limit): raised here as the OSError the CLI explains in one line, with the errno
    the message names, or as no room when it names none."""
    import re

    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, RuntimeError) as exc:
        Path(path).unlink(missing_ok=True)  # a half-written file is of no use to anyone
        m = re.search(r"os error (\d+)", str(exc))
        code = int(m.group(1)) if m else errno.ENOSPC
        raise OSError(code, os.strerror(code) if m else "written only in part (disk full or a file-size limit)",
                      str(path)) from exc


@contextlib.contextmanager
def replaced_whole(path: Path) -> Iterator[Path]:
    """Yield ``PATH.tmp`` to write; once written, rename it to ``path`` (atomic on one file system),
    so that a write killed or failed midway leaves no half-written file under that name, and whatever
    was there before stays. A failed write removes the temporary file and raises as
    :func:`write_errors_as_os_errors` does."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with write_errors_as_os_errors(tmp):
            yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def nifti_gz_whole(path: Path, data_bytes: int) -> bool:
    """Whether a NIfTI-1 .nii.gz holds its whole image: the gzip trailer's uncompressed size
    (mod 2**32) is the header's voxel offset plus the image's bytes. A file cut short ends inside
    the compressed data, whose last four bytes match that size by chance once in 2**32. O(1): a
    full decompression to check the CRC took 0.28 s for one 512x512x300 mask, whose write took 0.08 s."""
    import struct
    import zlib

    with open(path, "rb") as f:
        head = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(f.read(4096), 352)
        size = f.seek(0, os.SEEK_END)
        if size < 24 or len(head) < 352 or struct.unpack("<i", head[:4])[0] != 348:
            return False
        f.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", f.read(4))[0]
    vox_offset = int(struct.unpack("<f", head[108:112])[0])
    return isize == (vox_offset + data_bytes) % 2**32


def write_seg_nrrd(masks: np.ndarray, like: sitk.Image, path: Path, names: list[str],
                   color: tuple[int, int, int], terminology: str) -> None:
    """A 3D Slicer segmentation file: one segment per proposal, each on its own layer
    (proposals overlap), as Slicer's vtkMRMLSegmentationStorageNode writes it.

    Written here slice by slice rather than by ``nrrd.write`` (pynrrd formats the header's numbers):
    pynrrd needs the whole interleaved array and copies it once more to bytes, 563 MB beyond the
    masks for 8 proposals on 512x512x200 (and it transposed twice, 9.8 s there before this was
    written). Streaming one interleaved slice at a time through gzip needs a few MB."""
    import zlib

    from nrrd.formatters import format_optional_vector_list, format_vector

    from .proposals import bounding_box

    n, nz, ny, nx = masks.shape
    d = np.array(like.GetDirection()).reshape(3, 3) * np.array(like.GetSpacing())[None, :]
    rgb = " ".join(f"{c / 255:.6f}" for c in color)
    extent = f"0 {nx - 1} 0 {ny - 1} 0 {nz - 1}"
    fields = {"type": "uint8", "dimension": "4", "space": "left-posterior-superior", "sizes": f"{n} {nx} {ny} {nz}",
              "space directions": format_optional_vector_list([None] + [d[:, a] for a in range(3)]),
              "kinds": "list domain domain domain", "encoding": "gzip",
              "space origin": format_vector(np.array(like.GetOrigin()))}
    values = {"Segmentation_MasterRepresentation": "Binary labelmap",
              "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
              "Segmentation_ReferenceImageExtentOffset": "0 0 0"}
    for i in range(n):
        values.update({
            f"Segment{i}_ID": f"proposal_{i + 1:02d}", f"Segment{i}_Name": names[i],
            f"Segment{i}_NameAutoGenerated": "0", f"Segment{i}_Color": rgb, f"Segment{i}_ColorAutoGenerated": "0",
            f"Segment{i}_Layer": str(i), f"Segment{i}_LabelValue": "1", f"Segment{i}_Extent": extent,
            f"Segment{i}_Tags": f"TerminologyEntry:{terminology}|",
        })
    header = ("NRRD0005\n# Complete NRRD file format specification at:\n# http://teem.sourceforge.net/nrrd/format.html\n"
              + "".join(f"{k}: {v}\n" for k, v in fields.items()) + "".join(f"{k}:={v}\n" for k, v in values.items()) + "\n")
    # The data run proposal fastest, then x, y, z: each axial slice as (Y, X, N). Only the box that
    # holds a voxel is interleaved; the rest of a slice stays zero. gzip level 1: 0.36 s and 2.4 MB
    # for a 512x512x200 liver, against level 9's 1.5 s and 0.63 MB.
    box = bounding_box(masks.any(0))
    plane = np.zeros((ny, nx, n), np.uint8)
    empty = plane.tobytes()
    gz = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    with open(path, "wb") as f:
        f.write(header.encode("utf-8"))
        for z in range(nz):
            if box[0].start <= z < box[0].stop:
                plane[box[1:]] = masks[(slice(None), z) + box[1:]].transpose(1, 2, 0)
                f.write(gz.compress(plane.tobytes()))
            else:
                f.write(gz.compress(empty))
        f.write(gz.flush())


def write_report(report: dict, path: Path) -> None:
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:  # a programming error, never a user's
        raise AssertionError(f"report lacks {missing}")
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
