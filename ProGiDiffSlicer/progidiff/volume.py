"""Reading scans, intensity preprocessing, and the model grid.

Everything works in world (physical, LPS) coordinates through SimpleITK, so a scan
stored RAS, LPS, LAS, permuted or oblique gives the same model input, and outputs are
resampled back exactly onto the input's grid.

The *model grid* is an axis-aligned (identity direction) stack of axial slices at the
model's spacing, ``size_xy`` pixels wide (at inference, wider for a wide body: ``body_window``),
centred in-plane on the body's centre of mass and covering the scan's whole superior-inferior extent.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: CT soft-tissue window (level 50, width 500 HU), mapped to [0, 1].
CT_WINDOW = (-200.0, 300.0)
#: MR robust scaling: these percentiles of the body's voxels map to 0 and 1.
MR_PERCENTILES = (0.5, 99.5)
#: Largest number of voxels a scan may have (about 2.1 GB as float32); larger is refused.
MAX_VOXELS = 1024 * 1024 * 512


@dataclass
class Scan:
    """A 3D scalar image with its source and modality information."""

    image: sitk.Image
    path: str
    dicom_modality: str | None = None  # the DICOM Modality tag, when read from DICOM

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.image.GetSpacing())) / 1000.0


def is_image_file(path: Path) -> bool:
    """A NIfTI/NRRD/MHA file; not a hidden one (macOS's "._scan.nii.gz" companions are no images)."""
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and any(name.endswith(s) for s in IMAGE_SUFFIXES)


@contextmanager
def quiet_itk() -> Iterator[None]:
    """Keep ITK's warnings (printed on stderr with the C++ source path) off the terminal where ProGiDiff says
    the same in one line of its own, or where it is no fault."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def dicom_series(folder: str | os.PathLike) -> list[str]:
    """The DICOM series IDs in ``folder``; none for a folder of other files, which is no fault (ITK's
    "No Series were found" is kept quiet)."""
    with quiet_itk():
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])


def read_scan(path: str | os.PathLike, series: str | None = None) -> Scan:
    """Read a NIfTI/NRRD/MHA file or a DICOM folder; refuse what the model cannot use."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder. Check the path.")
    modality = None
    if p.is_dir():
        ids = dicom_series(p)
        if not ids:
            raise InputError(f"{p}: this folder holds no DICOM series. Give a DICOM folder or a NIfTI/NRRD/MHA file.")
        if series is None and len(ids) > 1:
            raise InputError(f"{p}: this folder holds {len(ids)} DICOM series ({', '.join(ids)}); pick one with --series UID.")
        uid = series or ids[0]
        if uid not in ids:
            raise InputError(f"{p}: no DICOM series {uid} here; the series are {', '.join(ids)}.")
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(p), uid)
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        try:
            with quiet_itk():   # its "missing slices" warning: _check_slice_gaps says it in one line
                image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"{p}: the DICOM series cannot be read ({_first_line(exc)}). Is a file truncated?") from exc
        try:
            modality = reader.GetMetaData(0, "0008|0060").strip().upper() or None
        except RuntimeError:
            modality = None
        _check_slice_gaps(reader, len(files), p, image.GetSpacing()[2])
    else:
        if series is not None:
            log.warning("%s: --series %s is for a DICOM folder; this is a file, read as it is", p, series)
        _check_complete(p)
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise InputError(f"{p}: cannot be read as an image ({_first_line(exc)}). Is the file complete and a NIfTI/NRRD/MHA?") from exc
        if image.HasMetaDataKey("0008|0060"):
            modality = image.GetMetaData("0008|0060").strip().upper() or None
    return Scan(validate_image(image, str(p)), str(p), modality)


def _check_slice_gaps(reader: sitk.ImageSeriesReader, n: int, p: Path, read_spacing: float) -> None:
    """Refuse a series with missing (e.g. corrupt, skipped) slices: ITK would only warn and
    stretch the volume, and masks would land in the wrong place."""
    if n < 3:
        return
    try:
        orient = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
        pos = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
    except (RuntimeError, ValueError):
        return  # no position tags: nothing to check
    normal = np.cross(orient[:3], orient[3:6])
    d = np.diff(np.sort(pos @ normal))
    if not len(d):
        return
    if d.min() < 1e-3:
        k = int(np.argmin(d))
        raise InputError(f"{p}: two slices of the DICOM series lie at the same position (slices {k + 1} and {k + 2}); "
                         "it mixes acquisitions (echoes, phases or a repeat): export one of them as its own series.")
    if d.max() > 1.5 * np.median(d):
        k = int(np.argmax(d))
        raise InputError(f"{p}: slices are missing from the DICOM series (a gap of {d[k]:.1f} mm where slices are "
                         f"{np.median(d):.1f} mm apart, after slice {k + 1}); a file may be corrupt or absent.")
    if d.max() - d.min() > 0.1 * np.median(d):
        # ITK reads the slices as evenly spaced; its own warning is kept quiet (quiet_itk), so it is said here.
        off = float(np.abs(np.cumsum(d) - read_spacing * np.arange(1, len(d) + 1)).max())
        log.warning("%s: the slices are %.2f to %.2f mm apart and are read %.2f mm apart: masks may lie up to %.1f mm "
                    "off along the body", p, d.min(), d.max(), read_spacing, off)


def _check_complete(p: Path) -> None:
    """Refuse truncated files, which ITK's NIfTI reader would silently pad with zeros.

    A .gz is decompressed as a stream (a truncated one ends early); a NIfTI must hold at
    least the bytes its header promises."""
    import gzip
    import zlib

    name = p.name.lower()
    total = 0
    try:
        if name.endswith(".gz"):
            with gzip.open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    total += len(chunk)
        else:
            total = p.stat().st_size
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"{p}: the file is truncated or corrupt ({exc}); download or copy it again.") from exc
    if name.endswith((".nii", ".nii.gz")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(f"{p}: cannot be read as an image ({_first_line(exc)}).") from exc
        bytes_per = sitk.GetArrayViewFromImage(sitk.Image([1] * 2, reader.GetPixelID(), reader.GetNumberOfComponents())).itemsize
        need = int(np.prod(reader.GetSize(), dtype=np.int64)) * bytes_per * reader.GetNumberOfComponents() + 348
        if total < need:
            raise InputError(f"{p}: the file is truncated ({total:,} of at least {need:,} bytes); download or copy it again.")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with the source location; the last line says what went wrong.
    return lines[-1][:160] if lines else type(exc).__name__


#: An image of whole numbers from 0 with at most this many distinct values is a label map (a segmentation),
#: not a scan: TotalSegmentator's have up to 118 (117 structures and background); a CT or MR, even one stored
#: in 8 bits, holds hundreds to thousands (../shared/data's CT: 2,598; its MR: 832).
LABEL_MAP_MAX_VALUES = 128


def _refuse_label_map(image: sitk.Image, name: str) -> None:
    """Refuse a label map given as the scan (labelsTr/ instead of imagesTr/, or a segmentation picked as
    Slicer's input volume): the model would segment it and return confident nonsense."""
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind not in "iu" or arr.size == 0:
        return
    # Every other voxel on each axis: 0.05 s for a 512x512x300 scan on 2 cores; a scan's distinct values
    # are not thinned out by it, and a label map's only lose tiny structures, which keeps it under the bound.
    sample = arr[::2, ::2, ::2]
    lo, hi = int(sample.min()), int(sample.max())
    if lo < 0 or hi > 65535:
        return
    distinct = int(np.count_nonzero(np.bincount(sample.ravel())))
    if distinct <= LABEL_MAP_MAX_VALUES:
        raise InputError(f"{name}: looks like a label map ({distinct} distinct whole values from {lo} to {hi}), not a "
                         "CT or MR scan; give the image the labels were drawn on.")


def validate_image(image: sitk.Image, name: str) -> sitk.Image:
    """Check a scan is a usable 3D scalar volume; return it as float32."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector image); give a grey-scale CT or MR.")
    dim = image.GetDimension()
    if dim == 4:
        if image.GetSize()[3] == 1:
            image = image[:, :, :, 0]
        else:
            raise InputError(f"{name}: is a 4D series ({image.GetSize()[3]} volumes); extract one 3D volume first.")
    elif dim != 3:
        raise InputError(f"{name}: is a {dim}D image; ProGiDiff needs a 3D volume.")
    size = image.GetSize()
    if min(size) < 2 or sorted(size)[1] < 16:
        raise InputError(f"{name}: is too small to segment ({'x'.join(map(str, size))} voxels); a 3D scan is needed, not a single slice or scout.")
    if int(np.prod(size, dtype=np.int64)) > MAX_VOXELS:
        raise InputError(f"{name}: has {np.prod(size, dtype=np.int64):,} voxels, more than the {MAX_VOXELS:,} ProGiDiff takes; crop or downsample it first.")
    spacing = image.GetSpacing()
    if any((not math.isfinite(s)) or s <= 1e-3 or s > 20.0 for s in spacing):
        raise InputError(f"{name}: voxel spacing {tuple(round(s, 4) for s in spacing)} mm is outside 0.001–20 mm; the header's geometry is wrong.")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise InputError(f"{name}: its direction matrix is not orthonormal (sheared); resample it to an orthogonal grid first.")
    _refuse_label_map(image, name)
    image = sitk.Cast(image, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(arr)
    if not finite.all():
        if not finite.any():
            raise InputError(f"{name}: holds no finite voxel values.")
        log.warning("%s: %d NaN/inf voxels set to the minimum value", name, int((~finite).sum()))
        fixed = np.where(finite, arr, float(np.nanmin(np.where(finite, arr, np.nan))))
        out = sitk.GetImageFromArray(fixed.astype(np.float32))
        out.CopyInformation(image)
        image = out
        arr = sitk.GetArrayViewFromImage(image)
    if float(arr.max()) - float(arr.min()) < 1e-6:
        raise InputError(f"{name}: every voxel has the same value ({float(arr.min()):g}); the image is blank.")
    return image


def guess_modality(scan: Scan) -> tuple[str, str]:
    """(modality, reason). DICOM tag first; else CT if it looks like Hounsfield units.

    Heuristic for files without the tag: a CT holds air near -1000 HU, so its 1st
    percentile is below -500 and at least 2 % of voxels are below -500. MR intensities
    are non-negative or only slightly negative.
    """
    if scan.dicom_modality in ("CT", "MR"):
        return scan.dicom_modality, "DICOM Modality tag"
    arr = sitk.GetArrayViewFromImage(scan.image)
    sample = arr.reshape(-1)[:: max(1, arr.size // 200_000)]
    low = float(np.percentile(sample, 1))
    frac_air = float((sample < -500).mean())
    if low < -500 and frac_air > 0.02:
        return "CT", f"intensity heuristic (1st percentile {low:.0f}, {frac_air:.0%} below -500: Hounsfield units)"
    if stored_without_intercept(scan.image):
        return "MR", (f"intensity heuristic (1st percentile {low:.0f}: not Hounsfield units; a CT stored without its "
                      "rescale intercept looks like this, air near 0 and soft tissue near 1024: if it is one, pass "
                      "--modality CT)")
    return "MR", f"intensity heuristic (1st percentile {low:.0f}: not Hounsfield units)"


@dataclass(frozen=True)
class GridSpec:
    """Geometry of the model's input: axial slices, ``size`` pixels at ``spacing`` mm."""

    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    size: tuple[int, int] = (96, 96)


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """World-axis min/max of the voxel centres (works for any direction matrix)."""
    size = image.GetSize()
    corners = [(i, j, k) for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    pts = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(float(c) for c in ijk)) for ijk in corners])
    return pts.min(0), pts.max(0)


def _axis_aligned(lo: np.ndarray, spacing: Sequence[float], size: Sequence[int]) -> sitk.Image:
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing([float(s) for s in spacing])
    ref.SetOrigin([float(v) for v in lo])
    ref.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    return ref


#: What a CT file holds when it was written without the DICOM rescale intercept (-1024): air near 0,
#: water near 1024. Some converters and research pipelines store CT so, as unsigned integers.
CT_STORED_OFFSET = 1024.0


def stored_without_intercept(image: sitk.Image) -> bool:
    """Whether a CT looks stored without its rescale intercept: no value below 0 (a scan in Hounsfield
    units holds air at -1000 and often padding below it), some air near 0, and at least a fifth of the
    voxels where fat and soft tissue lie once shifted (800 to 1300 stored, -224 to 276 HU)."""
    arr = sitk.GetArrayViewFromImage(image)
    s = arr.reshape(-1)[:: max(1, arr.size // 200_000)]
    return float(s.min()) >= 0.0 and float((s < 200).mean()) > 0.02 and float(((s >= 800) & (s <= 1300)).mean()) > 0.2


def in_hounsfield(image: sitk.Image, modality: str) -> sitk.Image:
    """A CT in Hounsfield units: shifted by -1024, with a warning, when it was stored without its
    rescale intercept, which the CT window (-200 to 300 HU) and the body threshold (-400 HU) would
    otherwise read as all bone. Anything else is returned as it is."""
    if modality != "CT" or not stored_without_intercept(image):
        return image
    log.warning("the CT's values look stored without the rescale intercept (air near 0, soft tissue near "
                "1024): read as Hounsfield units after subtracting %g", CT_STORED_OFFSET)
    return sitk.Cast(image, sitk.sitkFloat32) - CT_STORED_OFFSET


def on_model_grid(image: sitk.Image, grid: GridSpec, modality: str,
                  fit_body: int | None = None) -> tuple[sitk.Image, np.ndarray]:
    """A scan as the model sees it: the model grid's reference image and the scan resampled onto it and
    normalised (``model_grid``, ``to_model_grid``), a CT read in Hounsfield units first (once: the check
    and the shifted copy are per scan). ``fit_body``: widen the window to hold a wide body
    (``body_window``, in steps of that many pixels); inference does, training keeps the model's size."""
    if fit_body:
        ref, vol, _, _ = fitted_model_grid(image, grid, modality, fit_body)
        return ref, vol
    image = in_hounsfield(image, modality)
    ref = model_grid(image, grid, modality)
    return ref, to_model_grid(image, ref, modality)


def fitted_model_grid(image: sitk.Image, grid: GridSpec, modality: str,
                      multiple: int) -> tuple[sitk.Image, np.ndarray, np.ndarray, bool]:
    """``on_model_grid`` with the window fitted to the body (``body_window``: zoomed for a narrow body,
    widened in steps of ``multiple`` pixels for a wide one), and the body's reach (``body_reach_mm``) and
    whether the field of view cuts it (``body_fov_cut``) as measured for it, so that a caller who also
    needs them (segment's narrow-body warning) does not measure them again."""
    image = in_hounsfield(image, modality)
    # the body's reach and centre from one coarse resampling, for the window and for model_grid
    reach, centre, fov_cut = _reach_and_centre(image, modality)
    grid = body_window(image, grid, modality, multiple, reach=reach, fov_cut=fov_cut)
    ref = model_grid(image, grid, modality, centre=centre)
    return ref, to_model_grid(image, ref, modality), reach, fov_cut


def body_threshold(image: sitk.Image, modality: str) -> float:
    if modality == "CT":
        return -400.0
    arr = sitk.GetArrayViewFromImage(image)
    sample = arr.reshape(-1)[:: max(1, arr.size // 200_000)]
    lo, hi = np.percentile(sample, [1, 99])
    return float(lo + 0.1 * (hi - lo))


#: The coarse resampling (mm) on which the body's centre and reach are measured.
_BODY_STEP = 8.0


def _coarse_body(image: sitk.Image, modality: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The body mask (Z, Y, X) on an axis-aligned 8 mm resampling, and the scan's world bounds."""
    lo, hi = physical_bounds(image)
    step = _BODY_STEP
    size = np.maximum(1, np.ceil((hi - lo) / step).astype(int) + 1)
    ref = _axis_aligned(lo, (step, step, step), size)
    fill = float(sitk.GetArrayViewFromImage(image).min())
    coarse = sitk.GetArrayFromImage(sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, fill, sitk.sitkFloat32))
    return coarse > body_threshold(image, modality), lo, hi


def body_centre(image: sitk.Image, modality: str) -> np.ndarray:
    """World x, y of the body's centre of mass, from a coarse 8 mm resampling."""
    return _centre_of(*_coarse_body(image, modality))


def _centre_of(body: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    if body.sum() < 10:
        return (lo + hi) / 2
    zz, yy, xx = np.nonzero(body)
    return np.array([lo[0] + xx.mean() * _BODY_STEP, lo[1] + yy.mean() * _BODY_STEP, (lo[2] + hi[2]) / 2])


#: How far (mm) the body may reach past the window's edge before the window is widened. The model
#: trained on windows that cut the body by as much (its position and size augmentation), and the
#: sample CT (363 mm wide in a 384 mm window, 187 mm from its centre to its right side) keeps its window.
WINDOW_TOLERANCE_MM = 24.0
#: The widest window, as a multiple of the model's own (sampling time grows with its area).
MAX_WINDOW_FACTOR = 2.0


def largest_region(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """The largest connected region of ``mask`` (scipy.ndimage's connectivity: faces only unless
    ``structure`` says otherwise); all False where ``mask`` is empty. scipy.ndimage rather than MONAI's
    KeepLargestConnectedComponent, which needs scikit-image on the CPU."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


#: The radius (mm) of the opening that parts an arm resting against the trunk from it. Arms lie at the
#: sides in PET/CT and trauma CT, and touch the trunk: on a PET/CT of another person (docs/evaluation/
#: ct-other-person-petct) an arm touching it over some 50 mm took the body's reach from 174 to 242 mm
#: and the window from 384 to 480 mm, for no better Dice (liver, spleen within 0.01) in 1.6x the time.
#: 40 mm parts an upper arm (80-100 mm across) and leaves a trunk's flanks, whose outline curves more
#: gently: the reach of every other body measured is unchanged across the body and within 8 mm front to back.
TRUNK_OPENING_MM = 40.0


def trunk_region(plane: np.ndarray, step_mm: float) -> np.ndarray:
    """A body slice's trunk: its largest connected region, less what an opening of radius
    TRUNK_OPENING_MM (on a grid of ``step_mm``) parts from it, such as an arm lying against its side.
    The largest region where the opening leaves nothing (a slice through something narrower)."""
    from scipy import ndimage

    r = max(1, int(round(TRUNK_OPENING_MM / step_mm)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = xx * xx + yy * yy <= r * r
    core = largest_region(ndimage.binary_erosion(plane, disk))
    if not core.any():
        return largest_region(plane)
    # the core grown back by as much, inside the slice: the trunk to its outline, an arm only where it touches
    return largest_region(ndimage.binary_dilation(core, disk) & plane)


def body_reach_mm(image: sitk.Image, modality: str) -> np.ndarray:
    """How far (mm, world x and y) the body reaches from its centre of mass (``body_centre``) on any
    slice: each slice's trunk only (``trunk_region``), so a CT table, a separate arm or one lying
    against the side does not count."""
    return _reach_and_centre(image, modality)[0]


#: Where a slice's trunk runs along the scan's left or right edge for more than this (mm), the field of
#: view cuts the body's sides and the reach measured is the field's, not the body's (a small-field
#: reconstruction of an adult). Measured on the 8 mm resampling: the training scan, 363 mm wide in a field
#: 363 mm wide, meets its edge over 64 mm at most, and made 0.85x / 0.7x as wide (the field with it) over
#: 48 / 32 mm; cut to a field 330 / 300 / 270 mm wide, over 104 / 112 / 136 mm. The other person's PET/CT
#: and the MR person: 0 mm. Set between 64 and 104.
FOV_CUT_CONTACT_MM = 88.0


def body_fov_cut(image: sitk.Image, modality: str) -> bool:
    """Whether the scan's field of view cuts the trunk's sides (FOV_CUT_CONTACT_MM)."""
    return _reach_and_centre(image, modality)[2]


def _reach_and_centre(image: sitk.Image, modality: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """``body_reach_mm``, ``body_centre`` and ``body_fov_cut``, from one coarse resampling."""
    body, lo, hi = _coarse_body(image, modality)
    centre = _centre_of(body, lo, hi)
    reach = np.zeros(2)
    contact = 0
    for plane in body:
        if not plane.any():
            continue
        trunk = trunk_region(plane, _BODY_STEP)
        contact = max(contact, int(trunk[:, 0].sum()), int(trunk[:, -1].sum()))
        yy, xx = np.nonzero(trunk)
        for axis, idx in ((0, xx), (1, yy)):
            w = lo[axis] + idx * _BODY_STEP
            reach[axis] = max(reach[axis], centre[axis] - w.min(), w.max() - centre[axis])
    return reach, centre, contact * _BODY_STEP > FOV_CUT_CONTACT_MM


#: A trunk reaching less far than this (mm from its centre, world x: ``body_reach_mm``) is seen zoomed,
#: through a window of finer pixels, as large as if it reached this far. Made 0.7x as wide (131 mm) the
#: training scan cost the shipped model the spleen and stomach (Dice 0.589, 0.077), 0.6x (112 mm) the spleen,
#: stomach, aorta and a kidney, though its training drew bodies down to 0.6x: a small organ covers few of the
#: 6 mm pixels. The bound lies just under the narrowest body measured to meet every liver, spleen and kidney
#: target as it is, the training scan made 0.85x as wide (159 mm; the scan itself 187), which it leaves alone
#: (docs/evaluation/body-zoom).
ZOOM_REACH_MM = 155.0
#: The most a narrow body is zoomed (a trunk reaching 80 mm, an infant's, and below).
MAX_ZOOM = 2.0


def body_zoom(reach: np.ndarray, fov_cut: bool = False) -> float:
    """How much finer than the model's own the window's pixels are for a body whose trunk reaches
    ``reach`` (mm, world x and y): 1 for a body reaching ZOOM_REACH_MM or more, else as much as brings
    its reach to that (at most MAX_ZOOM). Continuous, so a body just under the bound is seen as before.
    1 where the scan's field of view cuts the trunk's sides (``fov_cut``): the body is wider than its reach."""
    rx = float(reach[0])
    if fov_cut or rx <= 0 or rx >= ZOOM_REACH_MM:
        return 1.0
    return min(MAX_ZOOM, ZOOM_REACH_MM / rx)


def body_window(image: sitk.Image, grid: GridSpec, modality: str, multiple: int = 8,
                reach: np.ndarray | None = None, fov_cut: bool | None = None) -> GridSpec:
    """The model grid fitted to the body: zoomed for a narrow body (``body_zoom``: finer in-plane pixels,
    the same number), and its square in-plane window widened to hold the whole body where the body reaches
    more than WINDOW_TOLERANCE_MM past it (in steps of ``multiple`` pixels, what the network's
    downsampling needs, up to MAX_WINDOW_FACTOR times the model's own). A body cut off by the window
    loses what lies beyond, and the model, which trained on a body nearly whole, fails inside it too:
    on the held-out slab of a body 1.3x as wide (472 mm), a 480 mm window instead of 384 mm took the
    stomach from Dice 0.168 to 0.802 and the left kidney from 0.503 to 0.779 (docs/evaluation/body-window).
    ``reach``, ``fov_cut``: ``body_reach_mm``'s and ``body_fov_cut``'s, where the caller has them."""
    if reach is None or fov_cut is None:
        reach, _, fov_cut = _reach_and_centre(image, modality)
    zoom = body_zoom(reach, fov_cut)
    if zoom != 1.0:
        sx, sy, sz = grid.spacing
        grid = GridSpec((sx / zoom, sy / zoom, sz), grid.size)
        log.debug("trunk reaches %.0f mm from its centre: model window zoomed %.2fx (%.2f mm pixels)",
                  reach[0], zoom, grid.spacing[0])
    w, h = grid.size
    half = (np.array([w, h]) - 1) * np.array(grid.spacing[:2]) / 2
    if np.all(reach <= half + WINDOW_TOLERANCE_MM):
        return grid
    need = max(int(math.ceil(2 * (r - WINDOW_TOLERANCE_MM) / s)) + 1 for r, s in zip(reach, grid.spacing[:2]))
    cap = int(max(w, h) * MAX_WINDOW_FACTOR) // multiple * multiple
    size = min(cap, max(w, h, int(math.ceil(need / multiple)) * multiple))
    log.debug("body %.0f x %.0f mm from its centre: model window widened to %d px (%.0f mm)",
              *reach, size, size * grid.spacing[0])
    return GridSpec(grid.spacing, (size, size))


def model_grid(image: sitk.Image, grid: GridSpec, modality: str, z_range: tuple[float, float] | None = None,
               centre: np.ndarray | None = None) -> sitk.Image:
    """Reference image of the model grid for this scan (identity direction), centred in-plane on
    ``centre`` (``body_centre``'s, computed here where not given)."""
    lo, hi = physical_bounds(image)
    centre = body_centre(image, modality) if centre is None else centre
    sx, sy, sz = grid.spacing
    w, h = grid.size
    z0, z1 = (lo[2], hi[2]) if z_range is None else z_range
    nz = max(1, int(math.floor((z1 - z0) / sz + 1e-6)) + 1)
    z0 = (z0 + z1) / 2 - (nz - 1) * sz / 2  # centre the slices in the extent
    origin = np.array([centre[0] - (w - 1) * sx / 2, centre[1] - (h - 1) * sy / 2, z0])
    return _axis_aligned(origin, grid.spacing, (w, h, nz))


def normalise(arr: np.ndarray, modality: str, body_mask: np.ndarray | None = None) -> np.ndarray:
    """Map intensities to [0, 1]: CT window, or MR robust percentiles of the body's voxels."""
    if modality == "CT":
        lo, hi = CT_WINDOW
    else:
        vals = arr[body_mask] if body_mask is not None and body_mask.sum() > 100 else arr.reshape(-1)
        lo, hi = (float(v) for v in np.percentile(vals, MR_PERCENTILES))
        if hi - lo < 1e-6:
            hi = lo + 1.0
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _grid_detail(image: sitk.Image, ref: sitk.Image) -> np.ndarray:
    """The finest detail (mm) the model grid carries along each image axis: half its spacing
    (the sampling limit), the grid's spacing taken along the axis (exact for axis permutations)."""
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    return direction.T @ np.array(ref.GetSpacing()) / 2


def antialias_sigma(image: sitk.Image, ref: sitk.Image) -> np.ndarray:
    """The Gaussian blur (sigma in mm, per image axis) that takes the voxels of ``image`` to the
    detail the model grid carries. A voxel is taken as a Gaussian whose FWHM is its spacing, so
    the blur is what widens it to FWHM = half the grid's spacing; none for voxels that coarse."""
    want, have = _grid_detail(image, ref), np.array(image.GetSpacing())
    return np.sqrt(np.maximum(want ** 2 - have ** 2, 0.0)) / 2.355


def antialias(image: sitk.Image, ref: sitk.Image) -> sitk.Image:
    """``image`` brought to the detail the model grid carries before it is resampled onto it.

    Linear resampling reads the 8 voxels nearest each grid point: a 0.8 x 0.8 x 1.5 mm scan kept
    nearly all of its per-voxel noise (a phantom of one dose: 10.3 HU on the grid against 3.2 HU
    from 3 mm voxels), and the shipped model, trained on 3 mm scans, lost the stomach on such a
    scan (README, *Other resolutions*). First ``BinShrink`` averages blocks of whole voxels up to
    that detail (box filter and subsampling in one pass, in the scan's pixel type: a 0.7 x 0.7 x 1 mm,
    512 x 512 x 600 CT becomes 128 x 128 x 300 without a full-size float copy), then a Gaussian
    adds what is left. Linear interpolation itself averages about a voxel (a triangle kernel,
    sigma up to 0.41 voxel), so a blur under half a voxel is skipped: on the 6 x 6 x 5 mm grid, scans
    of 2 mm or more in-plane and 1.7 mm or more between slices, the 3 mm training scans among them,
    are returned as they are."""
    want, have = _grid_detail(image, ref), np.array(image.GetSpacing())
    factors = [min(max(1, int(w // h)), n) for w, h, n in zip(want, have, image.GetSize())]
    src = image
    if max(factors) > 1:
        src = sitk.BinShrink(image, factors)
    sigma = antialias_sigma(src, ref)
    if (sigma >= 0.5 * np.array(src.GetSpacing())).any():
        # DiscreteGaussian (not the recursive one): exact for blurs of about a voxel.
        src = sitk.DiscreteGaussian(sitk.Cast(src, sitk.sitkFloat32), (sigma ** 2).tolist(), 32, 0.01, True)
    return src


def to_model_grid(image: sitk.Image, ref: sitk.Image, modality: str) -> np.ndarray:
    """The scan resampled onto the model grid and normalised: float32 (Z, H, W) in [0, 1]."""
    fill = -1024.0 if modality == "CT" else float(sitk.GetArrayViewFromImage(image).min())
    src = antialias(image, ref)
    res = sitk.GetArrayFromImage(sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, fill, sitk.sitkFloat32))
    body = res > body_threshold(image, modality)
    return normalise(res, modality, body)


def label_to_model_grid(mask: sitk.Image, ref: sitk.Image) -> np.ndarray:
    """A binary mask on the model grid (linear interpolation of the 0/1 mask, then > 0.5)."""
    m = sitk.Cast(mask, sitk.sitkFloat32)
    res = sitk.Resample(m, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(res) > 0.5


def from_model_grid(prob: np.ndarray, ref: sitk.Image, target: sitk.Image) -> np.ndarray:
    """A probability (Z, H, W) on the model grid → binary mask on the target's grid (its array order)."""
    src = sitk.GetImageFromArray(prob.astype(np.float32))
    src.CopyInformation(ref)
    res = sitk.Resample(src, target, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayViewFromImage(res) > 0.5


def target_box(support: tuple[slice, ...], ref: sitk.Image, target: sitk.Image) -> tuple[slice, ...]:
    """The target's array slices (k, j, i) outside which linear resampling from ``ref`` sees only
    zeros, given the model-grid array slices ``support`` that hold every non-zero value: the box one
    voxel wider (the interpolation's reach), mapped corner by corner (any direction matrix) and
    rounded outwards."""
    lo = [s.start - 1 for s in support][::-1]  # sitk index order (i, j, k)
    hi = [s.stop for s in support][::-1]        # last voxel + 1
    corners = [target.TransformPhysicalPointToContinuousIndex(ref.TransformContinuousIndexToPhysicalPoint(
        [float((lo, hi)[(c >> a) & 1][a]) for a in range(3)])) for c in range(8)]
    c = np.array(corners)
    size = np.array(target.GetSize())
    start = np.clip(np.floor(c.min(0)).astype(int), 0, size)
    stop = np.clip(np.ceil(c.max(0)).astype(int) + 1, 0, size)
    return tuple(slice(int(a), int(max(a, b))) for a, b in zip(start[::-1], stop[::-1]))


#: The box that holds nothing (array slices k, j, i).
EMPTY_BOX = (slice(0, 0),) * 3


def is_empty(box: tuple[slice, ...]) -> bool:
    return any(s.stop <= s.start for s in box)


def organ_box(probs: np.ndarray, ref: sitk.Image, target: sitk.Image) -> tuple[slice, ...]:
    """The target's array slices outside which every probability (N, Z, H, W) on the model grid
    resamples to 0 (EMPTY_BOX when there is nothing, or nothing inside the target)."""
    from .proposals import bounding_box

    support = bounding_box((probs > 0).any(0))
    box = EMPTY_BOX if is_empty(support) else target_box(support, ref, target)
    return EMPTY_BOX if is_empty(box) else box


def masks_from_model_grid(probs: np.ndarray, ref: sitk.Image, target: sitk.Image,
                          box: tuple[slice, ...] | None = None) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Probabilities (N, Z, H, W) on the model grid → (binary masks (N, K, J, I) inside ``box``,
    ``box``): by default the target's array slices that can hold a voxel of any mask (``organ_box``),
    or a box given that holds those. Outside it every mask is empty. The same voxels as
    ``from_model_grid`` on the whole target, resampled only where an organ can be: on a 512×512×200
    scan that whole-grid resampling took 3.4 s of the 18 s of a liver (8 proposals, 2 CPU cores),
    and with its outputs nearly all of a GPU's 26 s."""
    box = organ_box(probs, ref, target) if box is None else box
    if is_empty(box):
        return np.zeros((len(probs),) + tuple(max(0, s.stop - s.start) for s in box), bool), box
    size = [s.stop - s.start for s in box][::-1]
    origin = target.TransformIndexToPhysicalPoint([s.start for s in box][::-1])
    out = np.zeros((len(probs),) + tuple(size[::-1]), bool)
    for n, prob in enumerate(probs):
        src = sitk.GetImageFromArray(prob.astype(np.float32))
        src.CopyInformation(ref)
        res = sitk.Resample(src, size, sitk.Transform(), sitk.sitkLinear, origin, target.GetSpacing(),
                            target.GetDirection(), 0.0, sitk.sitkFloat32)
        out[n] = sitk.GetArrayViewFromImage(res) > 0.5
    return out, box


def context_slices(volume: np.ndarray, context: int) -> np.ndarray:
    """(Z, 2*context+1, H, W): each slice with its neighbours as channels (edges repeated)."""
    z = volume.shape[0]
    idx = np.clip(np.arange(z)[:, None] + np.arange(-context, context + 1)[None, :], 0, z - 1)
    return volume[idx]


def body_slices(volume: np.ndarray) -> np.ndarray:
    """Indices of the model-grid slices that hold body (not only air/background)."""
    return np.nonzero(volume.reshape(volume.shape[0], -1).max(1) > 0.05)[0]


def body_axis_coords(volume: np.ndarray) -> np.ndarray:
    """Each slice's normalised position along the body axis: 0 at the most inferior slice
    with body, 1 at the most superior (the model grid runs inferior → superior).

    The cheap estimate of anatomical guidance: it needs no model, but it is relative to the
    scan's field of view, so a scan that covers another part of the body shifts it
    (the ablation in docs/evaluation/ablation measures what that costs)."""
    idx = body_slices(volume)
    z = np.arange(volume.shape[0], dtype=np.float32)
    if len(idx) < 2:
        return np.full(volume.shape[0], 0.5, np.float32)
    return np.clip((z - idx.min()) / float(idx.max() - idx.min()), 0.0, 1.0).astype(np.float32)


def array_to_image(arr: np.ndarray, like: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(like)
    return img


def find_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand inputs: files, DICOM folders, and folders of files, of DICOM folders or of a folder per
    patient holding one scan file (the TotalSegmentator dataset's ``s0001/ct.nii.gz``, beside its
    ``segmentations/``)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise InputError(f"{p}: no such file or folder. Check the path.")
        if p.is_file():
            out.append(p)
        elif dicom_series(p):
            out.append(p)
        else:
            kids = []
            for k in sorted(p.iterdir()):
                if is_image_file(k) or (k.is_dir() and dicom_series(k)):
                    kids.append(k)
                elif k.is_dir() and not k.name.startswith("."):
                    scans = [f for f in sorted(k.iterdir()) if is_image_file(f)]
                    if len(scans) == 1:
                        kids.append(scans[0])
                    elif scans:  # which of them is the scan is not ours to guess
                        log.warning("%s: holds %d image files, not one scan: skipped; give the scan by name", k, len(scans))
            if not kids:
                raise InputError(f"{p}: holds no NIfTI/NRRD/MHA file, no DICOM series and no folder of one scan file.")
            out.extend(kids)
    return out


def case_name(path: Path) -> str:
    name = path.name
    for s in IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def case_names(paths: Sequence[Path]) -> list[str]:
    """A name per input, each its own: the file's (case_name), or where several inputs share one
    (``s0001/ct.nii.gz``, ``s0002/ct.nii.gz``: the TotalSegmentator dataset, a folder per patient) the
    nearest folders that tell them apart (``s0001``, ``s0002``); a cohort's outputs go to one subfolder
    per name, and a shared one would have written one case over another."""
    names = [case_name(p) for p in paths]
    for shared in {n for n in names if names.count(n) > 1}:
        group = [i for i, n in enumerate(names) if n == shared]
        parts = [Path(paths[i]).resolve().parent.parts for i in group]
        for depth in range(1, max(len(x) for x in parts) + 1):
            tails = ["_".join(x[-depth:]) for x in parts]
            if len(set(tails)) == len(tails):
                break
        for i, tail in zip(group, tails):
            names[i] = tail
    for i, n in enumerate(names):  # a folder's name may still be another input's own name
        if names.count(n) > 1:
            names[i] = f"{n}_{i + 1}"
    return names
