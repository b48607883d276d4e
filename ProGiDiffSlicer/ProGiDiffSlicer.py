"""ProGiDiff: prompt-guided diffusion proposals for organ segmentation (3D Slicer module).

Thin client of the ``progidiff`` engine: the widget drives a state machine, a persistent
worker thread owns the model, and all MRML access goes through ProGiDiffSlicerLib.mrml_io.
"""
from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from ProGiDiffSlicerLib.state import State, StateMachine

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


class ProGiDiffSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ProGiDiff"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ProGiDiff developers"]
        self.parent.helpText = (
            "Type an organ, press Segment: a diffusion model returns N different mask proposals. "
            "Cycle with Previous/Next ([ and ] keys), check the uncertainty map, Accept one into your "
            "segmentation and edit it in the Segment Editor. "
            "<a href='https://github.com/progidiff/SlicerProGiDiff'>Documentation</a>.")
        self.parent.acknowledgementText = (
            "Method: ProGiDiff (arXiv 2601.16060). Built on diffusers, MONAI, PyTorch and SimpleITK. "
            "Sample data: TotalSegmentator test files (Apache-2.0).")


@parameterNodeWrapper
class ProGiDiffSlicerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    targetSegmentation: vtkMRMLSegmentationNode
    prompt: str = "liver"
    proposals: Annotated[int, WithinRange(1, 64)] = 8
    steps: Annotated[int, WithinRange(1, 200)] = 4
    seed: int = 0
    forceCPU: bool = False
    modality: Annotated[str, Choice(["auto", "CT", "MR"])] = "auto"


def known_organs() -> list[str]:
    """Organ names for the completer, read from the vocabulary file (no torch import)."""
    with open(os.path.join(MODULE_DIR, "progidiff", "vocabulary.json"), encoding="utf-8") as f:
        return [o["display"] for o in json.load(f)["organs"]]


class ProGiDiffSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.machine = StateMachine()
        self.job = None
        self.session = None
        self.uncertaintyNode = None
        self.shortcuts = []
        self.timer = None

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        # No installs and no torch import here: generic tests build this widget without a main window.
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ProGiDiffSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ProGiDiffSlicerLogic()

        organs = known_organs()
        self.ui.organComboBox.addItems(organs)
        completer = qt.QCompleter(organs, self.ui.organComboBox)
        completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        completer.setFilterMode(qt.Qt.MatchContains)
        self.ui.organComboBox.setCompleter(completer)

        self.ui.segmentButton.connect("clicked(bool)", lambda checked=False: self.onSegment())
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.unloadModelButton.connect("clicked(bool)", self.onUnload)
        self.ui.previousButton.connect("clicked(bool)", self.onPrevious)
        self.ui.nextButton.connect("clicked(bool)", self.onNext)
        self.ui.acceptButton.connect("clicked(bool)", self.onAccept)
        self.ui.discardButton.connect("clicked(bool)", self.onDiscard)
        self.ui.resampleButton.connect("clicked(bool)", self.onResample)
        self.ui.opacitySlider.connect("valueChanged(int)", self.onOpacity)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onShow3D)
        self.ui.uncertaintyCheckBox.connect("toggled(bool)", self.onUncertainty)
        self.ui.organComboBox.connect("currentTextChanged(QString)", self.onPromptChanged)

        self.timer = qt.QTimer()
        self.timer.setInterval(100)  # progress polling; the worker never touches Qt
        self.timer.connect("timeout()", self.poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.apply(self.machine.ui())

    def cleanup(self) -> None:
        self.removeObservers()
        self.removeShortcuts()
        if self.timer:
            self.timer.stop()
        if self.job is not None:
            self.job.cancel()
        if self.logic:
            self.logic.cleanup()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.installShortcuts()

    def exit(self) -> None:
        self.removeShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def installShortcuts(self) -> None:
        """[ and ] cycle proposals, Return accepts; only while the module is shown."""
        self.removeShortcuts()
        main = slicer.util.mainWindow()
        if main is None:
            return
        for key, slot in (("]", self.onNext), ("[", self.onPrevious), ("Ctrl+Return", self.onAccept)):
            sc = qt.QShortcut(qt.QKeySequence(key), main)
            sc.connect("activated()", slot)
            self.shortcuts.append(sc)

    def removeShortcuts(self) -> None:
        for sc in self.shortcuts:
            sc.setParent(None)
            sc.deleteLater()
        self.shortcuts = []

    def onSceneStartClose(self, caller, event) -> None:
        self.onDiscard()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            # the first scan, not a label map (a child class of scalar volumes, which the selector hides)
            first = next((n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                          if not n.IsA("vtkMRMLLabelMapVolumeNode")), None)
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = node
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.ui.organComboBox.setCurrentText(self._parameterNode.prompt)

    def onPromptChanged(self, text: str) -> None:
        if self._parameterNode:
            self._parameterNode.prompt = text

    # ---- state → UI -----------------------------------------------------------------------
    def apply(self, view) -> None:
        self.ui.segmentButton.enabled = view.segment_enabled
        self.ui.cancelButton.enabled = view.cancel_enabled
        self.ui.inputsCollapsibleButton.enabled = view.inputs_enabled
        self.ui.samplingCollapsibleButton.enabled = view.inputs_enabled
        self.ui.progressBar.visible = view.progress_visible
        for name in ("previousButton", "nextButton", "acceptButton", "discardButton", "opacitySlider",
                     "show3DCheckBox", "uncertaintyCheckBox", "acceptWhichComboBox", "resampleButton"):
            getattr(self.ui, name).enabled = view.proposals_enabled and self.session is not None
        self.ui.statusLabel.text = view.status

    # ---- run --------------------------------------------------------------------------------
    def onResample(self) -> None:
        """Re-sample around my edits: keep the voxels changed in the Segment Editor since Accept."""
        edits = self.session.edits() if self.session else None
        if edits is None:
            self.ui.statusLabel.text = "No edits found: Accept a proposal, edit it in the Segment Editor, then re-sample."
            return
        edited, changed = edits
        self.onSegment(edited=edited, keep=changed)

    def onSegment(self, edited=None, keep=None) -> None:
        from ProGiDiffSlicerLib import mrml_io

        p = self._parameterNode
        try:
            if not mrml_io.ensure_dependencies(lambda msg: slicer.util.confirmOkCancelDisplay(msg, "ProGiDiff")):
                self.apply(self.machine.to(State.IDLE, "Dependencies are not installed; nothing was run."))
                return
            request = mrml_io.volume_request(p.inputVolume, self.ui.organComboBox.currentText, proposals=p.proposals,
                                             steps=p.steps, seed=p.seed, modality=p.modality, force_cpu=p.forceCPU,
                                             edited=edited, keep=keep)
        except Exception as exc:  # noqa: BLE001 - engine errors are one-line, user-facing
            self.apply(self.machine.to(State.FAILED, str(exc)))
            return
        self.onDiscard()
        self.job = self.logic.worker.submit(request)
        self.ui.progressBar.setValue(0)
        self.apply(self.machine.to(State.SAMPLING if self.logic.worker.model_loaded else State.LOADING))
        self.timer.start()

    def onCancel(self) -> None:
        if self.job is not None and not self.job.finished:
            self.job.cancel()
            self.apply(self.machine.to(State.CANCELLING))

    def poll(self) -> None:
        job = self.job
        if job is None:
            self.timer.stop()
            return
        done, total = job.progress
        if total:
            self.ui.progressBar.setValue(int(100 * done / total))
        if job.stage == "sampling" and self.machine.state == State.LOADING:
            self.apply(self.machine.to(State.SAMPLING, f"Sampling {job.request.proposals} proposals…"))
        self.ui.deviceNoticeLabel.text = job.notice
        if not job.finished:
            return
        self.timer.stop()
        self.job = None
        if job.stage == "done":
            self.session = self.logic.showProposals(job.result, self._parameterNode.inputVolume)
            self.showSession()
            self.apply(self.machine.to(State.DONE, f"{job.result.organ.display}: {self.session.count} proposals "
                                                   f"in {job.result.seconds:.1f} s on {job.result.device}"
                                                   f"{' with adapter ' + job.result.adapter if job.result.adapter else ''}; "
                                                   f"{self.session.ranges()}."))
        elif job.stage == "cancelled":
            self.apply(self.machine.to(State.IDLE, "Cancelled; the scene is unchanged."))
        else:
            self.apply(self.machine.to(State.FAILED, job.error or "Failed."))

    def showSession(self) -> None:
        s = self.session
        self.ui.proposalLabel.text = s.label() if s else "no proposals"
        self.ui.reviewNoticeLabel.text = s.notice() if s else ""
        if s:
            from ProGiDiffSlicerLib import mrml_io

            mrml_io.set_opacity(s.node, self.ui.opacitySlider.value / 100.0)

    def onPrevious(self) -> None:
        if self.session:
            self.session.previous()
            self.showSession()

    def onNext(self) -> None:
        if self.session:
            self.session.next()
            self.showSession()

    def onOpacity(self, value: int) -> None:
        if self.session:
            from ProGiDiffSlicerLib import mrml_io

            mrml_io.set_opacity(self.session.node, value / 100.0)

    def onShow3D(self, on: bool) -> None:
        if self.session:
            from ProGiDiffSlicerLib import mrml_io

            mrml_io.set_show_3d(self.session.node, on)

    def onUncertainty(self, on: bool) -> None:
        if self.session:
            from ProGiDiffSlicerLib import mrml_io

            self.uncertaintyNode = mrml_io.show_uncertainty(self.session.result.uncertainty,
                                                            self._parameterNode.inputVolume, self.uncertaintyNode, on)

    def onAccept(self) -> None:
        if not self.session:
            return
        p = self._parameterNode
        if not p.targetSegmentation:
            p.targetSegmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
        which = "consensus" if self.ui.acceptWhichComboBox.currentIndex == 1 else "shown"
        seg_id = self.logic.accept(self.session, p.targetSegmentation, which, confirm_overwrite=lambda name: slicer.util.confirmYesNoDisplay(
            f"'{name}' already exists in {p.targetSegmentation.GetName()}. Replace it?", "ProGiDiff"))
        if seg_id is None:
            self.ui.statusLabel.text = "Not accepted: the existing segment was kept."

    def onDiscard(self) -> None:
        if self.session:
            self.session.discard()
            self.session = None
        if self.uncertaintyNode is not None:
            from ProGiDiffSlicerLib import mrml_io

            mrml_io.remove_node(self.uncertaintyNode)
            self.uncertaintyNode = None
        self.machine.has_proposals = False
        if hasattr(self, "ui"):
            self.ui.uncertaintyCheckBox.checked = False
            self.showSession()
            self.apply(self.machine.ui())

    def onUnload(self) -> None:
        self.logic.worker.unload()
        self.ui.statusLabel.text = "Model unloaded; it will reload on the next Segment."


class ProGiDiffSlicerLogic(ScriptedLoadableModuleLogic):
    """Usable without the widget: ``process()`` runs the engine, ``showProposals()`` puts
    the result in the scene, ``accept()`` copies one into a segmentation."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._worker = None

    def getParameterNode(self):
        return ProGiDiffSlicerParameterNode(super().getParameterNode())

    @property
    def worker(self):
        if self._worker is None:
            from ProGiDiffSlicerLib.worker import SegmentationWorker

            self._worker = SegmentationWorker()
        return self._worker

    def process(self, volumeNode, prompt: str, proposals: int = 8, steps: int = 4, seed: int = 0,
                modality: str = "auto", forceCPU: bool = False, modelDir: Optional[str] = None):
        """Segment ``prompt`` in ``volumeNode``; blocks (processing Qt events) until done.

        volumeNode: scalar volume (CT or MR). prompt: organ text ("liver", "left kidney").
        proposals: N. steps: denoising steps. seed: seed of proposal 1. modality: auto/CT/MR.
        forceCPU: never use the GPU. modelDir: a model folder (default: the shipped model).
        Returns the engine's SegmentResult (masks in the volume's KJI array order, best first).
        """
        from ProGiDiffSlicerLib import mrml_io

        request = mrml_io.volume_request(volumeNode, prompt, proposals=proposals, steps=steps, seed=seed,
                                         modality=modality, force_cpu=forceCPU, model_dir=modelDir)
        job = self.worker.submit(request)
        while not job.wait(0.05):
            slicer.app.processEvents()
        if job.stage != "done":
            from progidiff.errors import ProGiDiffError

            raise ProGiDiffError(job.error or job.stage)
        return job.result

    def showProposals(self, result, volumeNode):
        from ProGiDiffSlicerLib import mrml_io
        from ProGiDiffSlicerLib.proposals_session import ProposalSession

        return ProposalSession(mrml_io.SlicerSceneIO(), result, volumeNode)

    def accept(self, session, targetNode, which: str = "shown", confirm_overwrite=lambda name: False):
        return session.accept(targetNode, which, confirm_overwrite)

    def cleanup(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None


class ProGiDiffSlicerTest(ScriptedLoadableModuleTest):
    """In Slicer: Developer mode → Reload and Test (or `Slicer --testing --python-code ...`)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_and_accept()

    def test_segment_and_accept(self):
        import numpy as np

        self.delayDisplay("Loading the sample CT as an oblique, flipped volume")
        import SimpleITK as sitk

        path = os.path.join(MODULE_DIR, "..", "Resources", "SampleData", "sample-ct-abdomen.nii.gz")
        if not os.path.exists(path):
            path = os.path.join(MODULE_DIR, "Resources", "SampleData", "sample-ct-abdomen.nii.gz")
        arr = sitk.GetArrayFromImage(sitk.ReadImage(path))[62:].astype(np.int16)
        ijk_to_ras = vtk.vtkMatrix4x4()
        for i, v in enumerate([-3.0, 3.0, 3.0]):
            ijk_to_ras.SetElement(i, i, v)
        volume = slicer.util.addVolumeFromArray(arr, ijkToRAS=ijk_to_ras, name="synthetic oblique CT")
        logic = ProGiDiffSlicerLogic()
        result = logic.process(volume, "hepatic", proposals=3, steps=3, forceCPU=True)
        self.assertEqual(result.organ.name, "liver")
        session = logic.showProposals(result, volume)
        seg = session.node.GetSegmentation()
        self.assertEqual(seg.GetNumberOfSegments(), 3)
        self.assertTrue(seg.GetNthSegment(0).GetName().startswith("Liver"))
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(session.node, seg.GetNthSegmentID(0), volume)
        self.assertEqual(mask.shape, arr.shape)
        np.testing.assert_array_equal(mask > 0, result.masks[0])
        target = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "target")
        seg_id = logic.accept(session, target)
        self.assertEqual(target.GetSegmentation().GetSegment(seg_id).GetName(), "Liver")
        self.assertIsNone(logic.accept(session, target, confirm_overwrite=lambda name: False))
        session.discard()
        self.assertEqual(slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems(), 1)
        logic.cleanup()
        self.delayDisplay("ProGiDiff self-test passed")
