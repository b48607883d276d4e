"""Array + IJK→RAS (real vtk matrices) ↔ SimpleITK, for axial, flipped and oblique volumes."""
import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from ProGiDiffSlicerLib.geometry import from_vtk_matrix, ijk_to_ras_of, image_from_array, to_vtk_matrix


def _oblique():
    t = vtk.vtkTransform()
    t.RotateWXYZ(23, 0.3, 0.5, 0.8)
    t.Scale(0.8, 0.9, 2.5)
    t.PostMultiply()
    t.Translate(-120.0, 40.0, 310.0)
    return from_vtk_matrix(t.GetMatrix())


MATRICES = {
    "axial": np.diag([0.7, 0.7, 3.0, 1.0]) + np.array([[0, 0, 0, -180], [0, 0, 0, -190], [0, 0, 0, 20], [0, 0, 0, 0]]),
    "flipped": np.diag([-3.0, -3.0, 3.0, 1.0]) + np.array([[0, 0, 0, 178], [0, 0, 0, 11], [0, 0, 0, 94], [0, 0, 0, 0]]),
    "oblique": _oblique(),
}


@pytest.mark.parametrize("kind", list(MATRICES))
def test_voxels_land_at_the_same_world_position(kind):
    m = MATRICES[kind]
    vm = to_vtk_matrix(m)
    arr = np.random.default_rng(0).random((7, 9, 11)).astype(np.float32)
    img = image_from_array(arr, from_vtk_matrix(vm))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), arr)
    for ijk in [(0, 0, 0), (10, 8, 6), (3, 7, 2)]:
        ras = vm.MultiplyPoint((*map(float, ijk), 1.0))[:3]
        lps = img.TransformIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose([-lps[0], -lps[1], lps[2]], ras, atol=1e-6)
    np.testing.assert_allclose(ijk_to_ras_of(img), m, atol=1e-9)


def test_engine_masks_come_back_on_the_slicer_grid(ct_path):
    """A mask the engine writes on the sitk image's grid has the volume node's KJI shape."""
    from progidiff.volume import GridSpec, from_model_grid, label_to_model_grid, model_grid

    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_path)))[60:]
    img = image_from_array(arr.astype(np.float32), MATRICES["oblique"])
    ball = np.zeros(arr.shape, np.uint8)
    ball[10:30, 30:70, 30:80] = 1
    mask = sitk.GetImageFromArray(ball)
    mask.CopyInformation(img)
    ref = model_grid(img, GridSpec((2.0, 2.0, 2.0), (128, 128)), "CT")
    back = from_model_grid(label_to_model_grid(mask, ref).astype(np.float32), ref, img)
    assert back.shape == arr.shape
    d = 2 * (back & (ball > 0)).sum() / (back.sum() + ball.sum())
    assert d > 0.9


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(axis=st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(0.1, 1)), angle=st.floats(-3.1, 3.1),
       spacing=st.tuples(st.floats(0.3, 6), st.floats(0.3, 6), st.floats(0.3, 8)),
       origin=st.tuples(st.floats(-500, 500), st.floats(-500, 500), st.floats(-500, 500)),
       flip=st.sampled_from([1.0, -1.0]), shape=st.tuples(st.integers(2, 9), st.integers(2, 9), st.integers(2, 9)))
def test_random_affines_round_trip_exactly(axis, angle, spacing, origin, flip, shape):
    """Property: any (flipped) rotation x spacing + origin survives array+matrix -> sitk -> matrix,
    and a mask's voxels keep their values and world positions."""
    t = vtk.vtkTransform()
    t.PostMultiply()
    t.Scale(spacing[0] * flip, spacing[1], spacing[2])
    t.RotateWXYZ(np.degrees(angle), *axis)
    t.Translate(*origin)
    m = from_vtk_matrix(t.GetMatrix())
    mask = (np.random.default_rng(1).random(shape) > 0.5).astype(np.uint8)
    img = image_from_array(mask, m)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), mask)
    np.testing.assert_allclose(ijk_to_ras_of(img), m, atol=1e-6 * max(1.0, np.abs(m).max()))
