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
    def read_segment(self, target: Any, segment_id: str, reference: Any) -> np.ndarray: ...


@dataclass
class ProposalInfo:
    volume_ml: float
    score: float
    diameter_mm: float = 0.0


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
        diameters = list(getattr(result, "diameters_mm", None) or [0.0] * len(result.scores))
        self.infos = [ProposalInfo(v, s, d) for v, s, d in zip(result.volumes_ml, result.scores, diameters)]
        self.count = len(self.infos)
        self.index = 0
        self.accepted: tuple[Any, str, np.ndarray] | None = None
        names = [f"{self.organ_name} — proposal {i + 1}" for i in range(self.count)]
        self.node = io.create_proposals(f"{self.organ_name} proposals", result.masks, reference, names,
                                        self.color, self.terminology)
        self.io.show_only(self.node, 0)

    @property
    def review(self) -> bool:
        return bool(self.result.ranking.review)

    def notice(self) -> str:
        """The warning shown under the proposals: empty when they agree."""
        found = self.result.alerts
        review = [w for w in found if "review" in w.codes]   # first, with the vote's note after it
        lines = ["⚠ " + w.text for w in review]
        if self.result.consensus_rule == "ranked-first":
            lines.append("Too little agreement for a vote: the consensus is the ranked-first proposal.")
        lines += ["⚠ " + w.text for w in found if w not in review]
        return "\n".join(lines)

    def label(self) -> str:
        """'3 of 8 · agreement 0.91 (usual 0.95) · 142 mL · 120 mm': the usual is the organ's agreement on the
        model's training data (its card), where the card records it, so the number can be read against it."""
        info = self.infos[self.index]
        usual = getattr(self.result, "usual_agreement", None)
        return (f"{self.index + 1} of {self.count} · agreement {self.result.ranking.agreement:.2f}"
                + (f" (usual {usual:.2f})" if usual is not None else "")
                + f" · {info.volume_ml:.0f} mL · {info.diameter_mm:.0f} mm")

    def ranges(self) -> str:
        """Measurements with their spread across proposals (min / median / max)."""
        import numpy as np

        v = [i.volume_ml for i in self.infos]
        d = [i.diameter_mm for i in self.infos]
        return (f"volume {min(v):.0f} / {np.median(v):.0f} / {max(v):.0f} mL, largest diameter "
                f"{min(d):.0f} / {np.median(d):.0f} / {max(d):.0f} mm (min / median / max of {self.count})")

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
        self.accepted = (target, seg_id, mask.copy())
        self.io.open_in_segment_editor(target, self.reference, seg_id)
        return seg_id

    def edits(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(edited mask, voxels the user changed) since Accept, or None when nothing changed:
        the input of "Re-sample around my edits"."""
        if self.accepted is None:
            return None
        target, seg_id, accepted = self.accepted
        edited = self.io.read_segment(target, seg_id, self.reference).astype(bool)
        changed = edited != accepted
        return (edited, changed) if changed.any() else None

    def discard(self) -> None:
        if self.node is not None:
            self.io.remove(self.node)
            self.node = None
