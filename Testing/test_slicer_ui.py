"""The .ui loads with PySide6's QUiLoader offscreen; a screenshot goes to Resources/Screenshots."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UI = REPO / "ProGiDiffSlicer" / "Resources" / "UI" / "ProGiDiffSlicer.ui"
SHOT = REPO / "Resources" / "Screenshots" / "ProGiDiffSlicer-panel.png"


def test_ui_loads_and_renders():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    from PySide6.QtCore import Property, QFile
    from PySide6.QtUiTools import QUiLoader

    from test_slicer_static import ui_names

    class ctkCollapsibleButton(QtWidgets.QGroupBox):
        """Stand-in for CTK's collapsible section (a titled group box)."""

        def _get(self):
            return self.title()

        def _set(self, v):
            self.setTitle(v)

        text = Property(str, _get, _set)

        def _c(self):
            return False

        def _sc(self, v):
            pass

        collapsed = Property(bool, _c, _sc)

    class qMRMLNodeComboBox(QtWidgets.QComboBox):
        """Stand-in for Slicer's node selector: shows a typical selection."""

        pass

    class qMRMLWidget(QtWidgets.QWidget):
        pass

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = QUiLoader()
    for cls in (ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLWidget):
        loader.registerCustomWidget(cls)
    f = QFile(str(UI))
    assert f.open(QFile.ReadOnly)
    widget = loader.load(f)
    f.close()
    assert widget is not None, loader.errorString()
    found = {w.objectName() for w in widget.findChildren(QtWidgets.QWidget)}
    names = {n for n in ui_names() if not n.endswith(("Layout", "Spacer"))}
    assert names - {"ProGiDiffSlicer"} <= found
    for combo, values in (("organComboBox", ["Liver", "Pancreas", "Left kidney"]),
                          ("inputVolumeSelector", ["sample-ct-abdomen"]), ("targetSegmentationSelector", ["Segmentation"])):
        widget.findChild(QtWidgets.QComboBox, combo).addItems(values)
    # Label texts in the format the module writes them (illustration of the panel, not a measurement).
    widget.findChild(QtWidgets.QLabel, "proposalLabel").setText("1 of 8 · agreement 0.93 · 1482 mL")
    widget.findChild(QtWidgets.QLabel, "statusLabel").setText("Liver: 8 proposals.")
    widget.findChild(QtWidgets.QLabel, "deviceNoticeLabel").setText(
        "Running on the CPU: no CUDA GPU was found (install the CUDA build of PyTorch for speed).")
    widget.findChild(QtWidgets.QProgressBar, "progressBar").setValue(100)
    widget.resize(400, 700)
    widget.show()
    app.processEvents()
    SHOT.parent.mkdir(parents=True, exist_ok=True)
    pix = widget.grab()
    assert pix.width() > 100
    assert pix.save(str(SHOT))
    assert SHOT.stat().st_size > 5000
