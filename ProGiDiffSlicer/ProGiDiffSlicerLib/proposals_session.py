"""Proposals in the scene and the accept/discard bookkeeping, written against a small
``SceneIO`` interface so it is tested without Slicer (``mrml_io.SlicerSceneIO`` is the
real implementation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np


class SceneIO(Protocol):
    def create_proposals(self, name: str, masks: np.ndarray, reference: Any, segment_names: Sequence[str],
                         color: tuple[float, float, float], terminology: str) -> Any: ...
    def show_only(self, proposals: Any, index: int) -> None: ...
    def remove(self, proposals: Any) -> None: ...
    def segment_names(self, target: Any) -> list[str]: ...
    def write_segment(self, target: Any, name: str, mask: np.ndarray, reference: Any,
                      color: tuple[float, float, float], terminology: str) -> str: ...
    def open_in_segment_editor(self, target: Any, reference: Any, segment_id: str) -> None: ...


@dataclass
class ProposalInfo:
    volume_ml: float
    score: float


class ProposalSession:
    """N proposals of one organ in the scene; one shown at a time, best-ranked first."""

    def __init__(self, io: SceneIO, result, reference: Any) -> None:
        self.io = io
        self.result = result
        self.reference = reference
        organ = result.organ
        self.organ_name = organ.display
        self.color = tuple(c / 255.0 for c in organ.color)
        self.terminology = organ.slicer_terminology()
        self.infos = [ProposalInfo(v, s) for v, s in zip(result.volumes_ml, result.scores)]
        self.count = len(self.infos)
        self.index = 0
        names = [f"{self.organ_name} — proposal {i + 1}" for i in range(self.count)]
        self.node = io.create_proposals(f"{self.organ_name} proposals", result.masks, reference, names,
                                        self.color, self.terminology)
        self.io.show_only(self.node, 0)

    @property
    def review(self) -> bool:
        return bool(self.result.ranking.review)

    def label(self) -> str:
        """'3 of 8 · agreement 0.91 · 142 mL'"""
        return (f"{self.index + 1} of {self.count} · agreement {self.result.ranking.agreement:.2f} · "
                f"{self.infos[self.index].volume_ml:.0f} mL")

    def show(self, index: int) -> None:
        self.index = index % self.count
        self.io.show_only(self.node, self.index)

    def next(self) -> None:
        self.show(self.index + 1)

    def previous(self) -> None:
        self.show(self.index - 1)

    def accept(self, target: Any, which: str = "shown",
               confirm_overwrite: Callable[[str], bool] = lambda name: False) -> str | None:
        """Copy the shown proposal (or the consensus) into ``target`` as a segment named and
        coloured by the organ; returns its id, or None when the user declined to overwrite."""
        mask = self.result.consensus if which == "consensus" else self.result.masks[self.index]
        name = self.organ_name
        if name in self.io.segment_names(target) and not confirm_overwrite(name):
            return None
        seg_id = self.io.write_segment(target, name, mask, self.reference, self.color, self.terminology)
        self.io.open_in_segment_editor(target, self.reference, seg_id)
        return seg_id

    def discard(self) -> None:
        if self.node is not None:
            self.io.remove(self.node)
            self.node = None
