"""Everything that touches slicer / MRML, behind the small interfaces the rest of the
module is written and tested against. The only file of the module that imports slicer."""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import slicer
import vtk

from .dependencies import install_message, missing_requirements, missing_torch
from .geometry import from_vtk_matrix, to_vtk_matrix
from .worker import SegmentRequest

log = logging.getLogger(__name__)


class SlicerSceneIO:
    """``proposals_session.SceneIO`` on the MRML scene."""

    def create_proposals(self, name: str, masks: np.ndarray, reference, segment_names: Sequence[str],
                         color: tuple[float, float, float], terminology: str):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(name))
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        seg = node.GetSegmentation()
        for i, (label, mask) in enumerate(zip(segment_names, masks)):
            sid = seg.AddEmptySegment(f"proposal_{i + 1:02d}", label, list(color))
            # Proposals overlap: Slicer keeps each overlapping segment on its own labelmap layer.
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, sid, reference)
            _set_terminology(seg.GetSegment(sid), terminology)
        return node

    def show_only(self, proposals, index: int) -> None:
        display = proposals.GetDisplayNode()
        seg = proposals.GetSegmentation()
        for i in range(seg.GetNumberOfSegments()):
            display.SetSegmentVisibility(seg.GetNthSegmentID(i), i == index)

    def remove(self, proposals) -> None:
        if proposals is not None and slicer.mrmlScene.IsNodePresent(proposals):
            slicer.mrmlScene.RemoveNode(proposals)

    def segment_names(self, target) -> list[str]:
        seg = target.GetSegmentation()
        return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]

    def write_segment(self, target, name: str, mask: np.ndarray, reference, color, terminology: str) -> str:
        slicer.mrmlScene.SaveStateForUndo()
        seg = target.GetSegmentation()
        if seg.GetNumberOfSegments() == 0 or not target.GetNodeReference(
                slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()):
            target.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        sid = seg.GetSegmentIdBySegmentName(name) or seg.AddEmptySegment("", name, list(color))
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), target, sid, reference)
        segment = seg.GetSegment(sid)
        segment.SetColor(*color)
        _set_terminology(segment, terminology)
        if target.GetDisplayNode() is None:
            target.CreateDefaultDisplayNodes()
        return sid

    def open_in_segment_editor(self, target, reference, segment_id: str) -> None:
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(target)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(reference)
        else:  # Slicer < 5.4
            editor.setMasterVolumeNode(reference)
        editor.mrmlSegmentEditorNode().SetSelectedSegmentID(segment_id)


    def read_segment(self, target, segment_id: str, reference) -> np.ndarray:
        return slicer.util.arrayFromSegmentBinaryLabelmap(target, segment_id, reference) > 0


def _set_terminology(segment, terminology: str) -> None:
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(terminology)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)


def set_opacity(proposals, opacity: float) -> None:
    if proposals is not None and proposals.GetDisplayNode() is not None:
        proposals.GetDisplayNode().SetOpacity(opacity)


def set_show_3d(proposals, show: bool) -> None:
    if proposals is None:
        return
    if show:
        proposals.CreateClosedSurfaceRepresentation()
    else:
        proposals.RemoveClosedSurfaceRepresentation()


def show_uncertainty(uncertainty: np.ndarray, reference, existing=None, show: bool = True):
    """The voxel-wise disagreement as a foreground overlay (created once, then updated)."""
    node = existing
    if node is None or not slicer.mrmlScene.IsNodePresent(node):
        m = vtk.vtkMatrix4x4()
        reference.GetIJKToRASMatrix(m)
        node = slicer.util.addVolumeFromArray(uncertainty.astype(np.float32), ijkToRAS=m,
                                              name=slicer.mrmlScene.GenerateUniqueName("ProGiDiff uncertainty"))
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        for color_id in ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeRainbow"):
            if slicer.mrmlScene.GetNodeByID(color_id) is not None:
                display.SetAndObserveColorNodeID(color_id)
                break
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
    else:
        slicer.util.updateVolumeFromArray(node, uncertainty.astype(np.float32))
    slicer.util.setSliceViewerLayers(foreground=node if show else None, foregroundOpacity=0.5 if show else 0.0)
    return node


def remove_node(node) -> None:
    if node is not None and slicer.mrmlScene.IsNodePresent(node):
        slicer.mrmlScene.RemoveNode(node)


def volume_request(volume_node, prompt: str, **options: Any) -> SegmentRequest:
    """A worker request from a volume node: voxels (copied), IJK→RAS with any linear parent
    transform applied, and the DICOM Modality when the volume came from the DICOM database."""
    from progidiff.errors import InputError

    if volume_node is None:
        raise InputError("Select an input volume first.")
    if volume_node.GetImageData() is None:
        raise InputError(f"{volume_node.GetName()}: the volume holds no image data.")
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras = from_vtk_matrix(m)
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"{volume_node.GetName()} is under a non-linear transform; harden it (Transforms module) first.")
        t = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(t)
        ijk_to_ras = from_vtk_matrix(t) @ ijk_to_ras
    return SegmentRequest(array=slicer.util.arrayFromVolume(volume_node).copy(), ijk_to_ras=ijk_to_ras,
                          prompt=prompt, dicom_modality=dicom_modality(volume_node), name=volume_node.GetName(),
                          **options)


def dicom_modality(volume_node) -> str | None:
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids or not getattr(slicer, "dicomDatabase", None):
        return None
    try:
        f = slicer.dicomDatabase.fileForInstance(uids[0])
        value = slicer.dicomDatabase.fileValue(f, "0008,0060") if f else ""
    except Exception:  # noqa: BLE001 - the database may be closed; the engine then guesses
        return None
    return value.strip().upper() or None


def ensure_dependencies(ask: Callable[[str], bool]) -> bool:
    """Install what is missing, after asking: torch through the PyTorch extension
    (PyTorchUtils picks the CUDA build for the driver), the rest as floors through
    slicer.packaging.pip_ensure (Slicer >= 5.12) or slicer.util.pip_install."""
    torch_missing = missing_torch()
    reqs = missing_requirements()
    if not torch_missing and not reqs:
        return True
    if not ask(install_message(torch_missing, reqs)):
        return False
    if torch_missing:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay("Install the PyTorch extension from the Extensions Manager, restart Slicer, and try again.")
            return False
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
            return False
    if reqs:
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(reqs, requester="ProGiDiff")
        else:
            slicer.util.pip_install(reqs)
    return not missing_torch() and not missing_requirements()


__all__ = ["SlicerSceneIO", "volume_request", "ensure_dependencies", "show_uncertainty", "set_opacity",
           "set_show_3d", "remove_node", "dicom_modality", "to_vtk_matrix"]
