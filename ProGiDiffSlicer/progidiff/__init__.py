"""ProGiDiff engine: prompt-guided diffusion proposals for organ segmentation.

Imports without 3D Slicer and without Qt. Heavy parts (torch, diffusers) load lazily
in the modules that need them.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import ProGiDiffError

__all__ = ["ProGiDiffError", "__version__"]
