"""The module's processing state machine: one place decides what the buttons, progress
bar and status say, so the UI cannot show "Segment" enabled while sampling."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(str, Enum):
    IDLE = "idle"
    LOADING = "loading"
    SAMPLING = "sampling"
    CANCELLING = "cancelling"
    DONE = "done"
    FAILED = "failed"


TRANSITIONS: dict[State, set[State]] = {
    State.IDLE: {State.LOADING, State.SAMPLING, State.FAILED},
    State.LOADING: {State.SAMPLING, State.CANCELLING, State.FAILED, State.IDLE},
    State.SAMPLING: {State.DONE, State.CANCELLING, State.FAILED},
    State.CANCELLING: {State.IDLE, State.FAILED, State.DONE},
    State.DONE: {State.IDLE, State.LOADING, State.SAMPLING, State.FAILED},
    State.FAILED: {State.IDLE, State.LOADING, State.SAMPLING},
}


@dataclass(frozen=True)
class UiState:
    segment_enabled: bool
    cancel_enabled: bool
    inputs_enabled: bool
    progress_visible: bool
    proposals_enabled: bool
    status: str


class StateMachine:
    def __init__(self) -> None:
        self.state = State.IDLE
        self.message = ""
        self.has_proposals = False

    def to(self, new: State, message: str = "") -> UiState:
        if new not in TRANSITIONS[self.state] and new != self.state:
            raise ValueError(f"no transition {self.state.value} -> {new.value}")
        self.state = new
        self.message = message
        if new == State.DONE:
            self.has_proposals = True
        return self.ui()

    def ui(self) -> UiState:
        s = self.state
        busy = s in (State.LOADING, State.SAMPLING, State.CANCELLING)
        default = {State.IDLE: "Ready.", State.LOADING: "Loading the model…", State.SAMPLING: "Sampling proposals…",
                   State.CANCELLING: "Cancelling…", State.DONE: "Done.", State.FAILED: "Failed."}[s]
        return UiState(segment_enabled=not busy, cancel_enabled=s in (State.LOADING, State.SAMPLING),
                       inputs_enabled=not busy, progress_visible=busy,
                       proposals_enabled=self.has_proposals and not busy, status=self.message or default)
