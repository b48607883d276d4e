"""Static checks of the Slicer module: ui names, CMake lists, MRML confinement, engine imports."""
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "ProGiDiffSlicer"


def ui_names() -> set[str]:
    root = ET.parse(MODULE / "Resources" / "UI" / "ProGiDiffSlicer.ui").getroot()
    return {w.get("name") for w in root.iter() if w.tag in ("widget", "layout", "spacer") and w.get("name")}


def test_every_ui_attribute_used_exists_in_the_ui_file():
    src = (MODULE / "ProGiDiffSlicer.py").read_text(encoding="utf-8")
    used = set(re.findall(r"\bui\.([A-Za-z_]\w*)", src))
    # getattr(self.ui, name) over a literal tuple of names
    for group in re.findall(r"for name in \(([^)]*)\)", src):
        used |= set(re.findall(r'"(\w+)"', group))
    missing = sorted(used - ui_names())
    assert not missing, f"used in ProGiDiffSlicer.py but absent from the .ui: {missing}"


def test_parameter_names_in_ui_match_the_parameter_node():
    root = ET.parse(MODULE / "Resources" / "UI" / "ProGiDiffSlicer.ui").getroot()
    bound = {p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    src = (MODULE / "ProGiDiffSlicer.py").read_text(encoding="utf-8")
    block = src.split("class ProGiDiffSlicerParameterNode:")[1].split("\n\n")[0]
    fields = set(re.findall(r"^\s+(\w+):", block, re.M))
    assert bound <= fields, bound - fields


def test_the_input_selector_offers_scans_not_label_maps():
    """A label map volume node is a scalar volume node's child class: without showChildNodeTypes=false the
    input selector lists every segmentation exported as a label map beside the scans (the engine refuses one
    read from a file, volume.LABEL_MAP_MAX_VALUES)."""
    root = ET.parse(MODULE / "Resources" / "UI" / "ProGiDiffSlicer.ui").getroot()
    selector = next(w for w in root.iter("widget") if w.get("name") == "inputVolumeSelector")
    props = {p.get("name"): p for p in selector.findall("property")}
    assert [s.text for s in props["nodeTypes"].iter("string")] == ["vtkMRMLScalarVolumeNode"]
    assert props["showChildNodeTypes"].find("bool").text == "false"


def test_cmakelists_lists_every_python_file_and_resource():
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "ProGiDiffSlicer")
    listed = set(re.findall(r"^\s+([\w./-]+\.(?:py|ui|png|json))\s*$", cmake, re.M))
    present = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*")
               if p.suffix in (".py", ".ui", ".png", ".json") and "__pycache__" not in p.parts}
    assert present == listed, f"not listed: {sorted(present - listed)}; listed but missing: {sorted(listed - present)}"


def test_only_mrml_io_imports_slicer():
    offenders = []
    for p in list((MODULE / "ProGiDiffSlicerLib").glob("*.py")) + list((MODULE / "progidiff").glob("*.py")):
        if p.name == "mrml_io.py":
            continue
        if re.search(r"^\s*(import slicer|from slicer|import qt\b|from MRML|import MRML)", p.read_text(encoding="utf-8"), re.M):
            offenders.append(p.name)
    assert not offenders


def test_engine_imports_without_slicer_or_qt():
    code = ("import sys, progidiff.engine, progidiff.cli, progidiff.segment, ProGiDiffSlicerLib.worker, "
            "ProGiDiffSlicerLib.proposals_session, ProGiDiffSlicerLib.state;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('slicer','qt','PySide6','PyQt5','PythonQt')];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=MODULE, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stdout + r.stderr


def test_extension_files():
    cm = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", 'EXTENSION_DEPENDS "PyTorch"',
                "find_package(Slicer", "add_subdirectory(ProGiDiffSlicer)", "project(ProGiDiff)"):
        assert key in cm, key
    assert "WITH_GENERIC_TESTS" in (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    import json

    entry = json.loads((REPO / "ProGiDiff.json").read_text(encoding="utf-8"))
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == "Segmentation"
    s4 = (REPO / "ProGiDiff.s4ext").read_text(encoding="utf-8")
    assert re.search(r"^depends PyTorch$", s4, re.M) and re.search(r"^scmurl ", s4, re.M)
    shot = re.search(r'EXTENSION_SCREENSHOTURLS "[^"]*/main/([^"]+)"', cm).group(1)
    assert (REPO / shot).is_file(), shot
    assert shot in (REPO / "README.md").read_text(encoding="utf-8")
