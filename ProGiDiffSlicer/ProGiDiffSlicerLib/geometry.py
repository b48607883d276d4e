"""Array + IJK-to-RAS matrix (Slicer) ↔ SimpleITK image (engine).

Slicer volumes are KJI arrays with a 4x4 IJK→RAS matrix; ITK images use LPS. The two
differ by diag(-1, -1, 1) on the world axes, for any orientation (oblique included).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_from_array(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """A SimpleITK image with the voxels of ``array_kji`` at the world positions of ``ijk_to_ras``."""
    m = RAS_TO_LPS @ np.asarray(ijk_to_ras, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError("the IJK-to-RAS matrix has a zero column")
    direction = m[:3, :3] / spacing
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction.ravel()])
    img.SetOrigin([float(v) for v in m[:3, 3]])
    return img


def ijk_to_ras_of(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK→RAS matrix of a SimpleITK image."""
    d = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())[None, :]
    m = np.eye(4)
    m[:3, :3] = d
    m[:3, 3] = image.GetOrigin()
    return RAS_TO_LPS @ m


def to_vtk_matrix(m: np.ndarray):
    import vtk

    out = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            out.SetElement(i, j, float(m[i, j]))
    return out


def from_vtk_matrix(vm) -> np.ndarray:
    return np.array([[vm.GetElement(i, j) for j in range(4)] for i in range(4)])
