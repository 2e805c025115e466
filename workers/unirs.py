"""UniRS analyser: the vision-language model on the chips the spectral screen let through.

- The model is loaded once per worker process (:func:`load_model`, called from the Celery
  ``worker_process_init`` signal) and kept in this module; tasks only call :func:`get_model`.
- Only chips whose spectral change score reaches ``analysis.model_score_threshold`` are sent to the model;
  the others are counted (``chips_kept_off_model``) — the GPU is the scarce resource.
- Per kept chip, one :meth:`UniRS.analyse_pair` call gives the change caption and an answer to every
  question template (the questions share the encoded images).
- The event class of the area comes from :meth:`UniRS.classify_sequence` over RGB renders of the last
  ``analysis.video_frames`` clear acquisitions (the model's "video" input).
- Each model answer is stored next to the pixel statistic that backs or contradicts it
  (:func:`agreement`): a model's word is never the only evidence in a report.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Settings
from eo.questions import QuestionTemplate
from workers.render import stretch_range
from workers.spectral import SpectralResult
from workers.tiling import PreparedPair, chip_images

logger = logging.getLogger(__name__)

NAME = "unirs"
# Events the model may name for the sequence of acquisitions (names from its training vocabulary).
EVENT_CLASSES = ("constructing", "harvesting", "ploughing", "flood", "fire", "landslide", "mudslide",
                 "post-earthquake", "non-event")
# At most this many chips per analysis go to the model (largest scores first); the rest are recorded.
MAX_MODEL_CHIPS = 16
# A numeric model answer "agrees" with the statistic when within this relative tolerance (or one MMU).
NUMERIC_TOLERANCE = 0.5

_FINGERPRINT_SPAN = 1 << 20
_lock = threading.Lock()
_state: dict[str, Any] = {"model": None, "path": None, "label": None}

_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)")


def load_model(settings: Settings) -> Any | None:
    """Load the UniRS checkpoint named by ``model.weights_path`` (once); None when none is configured."""
    path = settings.model.weights_path
    if path is None:
        return None
    with _lock:
        if _state["model"] is not None and _state["path"] == path:
            return _state["model"]
        from model import UniRS  # lazy: torch is only imported by processes that run the model

        started = time.monotonic()
        model = UniRS.from_pretrained(path, base_path=settings.model.base_weights_path, device=settings.model.device)
        _state.update(model=model, path=path, label=checkpoint_label(path))
        logger.info("UniRS loaded from %s in %.1f s (device %s)", path, time.monotonic() - started,
                    getattr(model, "device", "?"))
        return model


def get_model(settings: Settings) -> Any | None:
    """The process's model (loading it on first use if the worker signal did not)."""
    model = _state["model"]
    if model is not None and _state["path"] == settings.model.weights_path:
        return model
    return load_model(settings)


def checkpoint_label(path: Path) -> str:
    """How a checkpoint is named in ``analyses.analyser_run`` and findings: ``<directory name>.<8 hex>``, the
    hex a fingerprint of every file's name, size and bytes (the first and last MiB of large weight files),
    so two checkpoints that share a directory name are told apart without hashing gigabytes.
    Raises ``OSError`` if the directory cannot be read."""
    path = Path(path).expanduser().resolve()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        with file.open("rb") as handle:
            if size <= 2 * _FINGERPRINT_SPAN:
                digest.update(handle.read())
            else:
                digest.update(handle.read(_FINGERPRINT_SPAN))
                handle.seek(size - _FINGERPRINT_SPAN)
                digest.update(handle.read())
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.name) or "checkpoint"
    return f"{name}.{digest.hexdigest()[:8]}"


def loaded_checkpoint() -> str | None:
    """Label of the checkpoint this process has loaded, or None when no model is loaded."""
    if _state["model"] is None:
        return None
    return _state["label"]


@dataclass
class ChipAnswers:
    chip_index: int
    score: float
    caption: str
    answers: list[str]


@dataclass
class Event:
    label: str
    raw_text: str
    score: float
    frames: int
    dates: list[str]


@dataclass
class UnirsResult:
    chips: list[ChipAnswers]
    chips_total: int
    chips_kept_off_model: int
    chips_over_limit: int
    event: Event | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> ChipAnswers | None:
        return self.chips[0] if self.chips else None


def run(model: Any, pair: PreparedPair, spectral: SpectralResult, templates: Sequence[QuestionTemplate],
        settings: Settings, frames: Callable[[], tuple[list[np.ndarray], list[str]]]) -> UnirsResult:
    """Model pass over the chips that passed the spectral screen, plus the event class of the sequence."""
    started = time.monotonic()
    threshold = settings.analysis.model_score_threshold
    passing = sorted((c for c in spectral.chip_scores if c.score >= threshold), key=lambda c: c.score, reverse=True)
    kept_off = len(spectral.chip_scores) - len(passing)
    over_limit = max(0, len(passing) - MAX_MODEL_CHIPS)
    passing = passing[:MAX_MODEL_CHIPS]
    chips_by_index = {c.index: c for c in pair.chips}

    # The stretch of the thumbnails (every f-th pixel of the area); each chip is read again at full
    # resolution as a small window, so a large area never holds its full-resolution true colour.
    value_range = stretch_range(pair.thumbs.before, pair.thumbs.after, valid=pair.thumbs.valid)
    questions = [t.text for t in templates]
    answered: list[ChipAnswers] = []
    for score in passing:
        img_b, img_a = chip_images(pair, chips_by_index[score.index], value_range)
        result = model.analyse_pair(img_b, img_a, questions,
                                    max_new_tokens=settings.model.max_new_tokens)
        answers = [a.strip() for a in result.answers]
        answered.append(ChipAnswers(score.index, score.score, result.caption.strip(), answers))
        logger.info("UniRS chip %d (score %.3f): %r", score.index, score.score, result.caption[:120])

    event = None
    notes = []
    if answered:
        frame_list, dates = frames()
        if len(frame_list) >= 2:
            out = model.classify_sequence(frame_list, list(EVENT_CLASSES), max_new_tokens=settings.model.max_new_tokens)
            label, raw = tuple(out)[:2]
            event = Event(label=label, raw_text=str(raw).strip(), score=float(getattr(out, "score", 0.0)),
                          frames=len(frame_list), dates=dates)
        else:
            notes.append("event class not computed: fewer than two clear acquisitions of the area")
    else:
        notes.append(f"no chip reached the model score threshold {threshold:g}; the model was not run")
    return UnirsResult(chips=answered, chips_total=len(spectral.chip_scores), chips_kept_off_model=kept_off,
                       chips_over_limit=over_limit, event=event, seconds=round(time.monotonic() - started, 3),
                       notes=notes)


def agreement(answer: str, template: QuestionTemplate, value: float | None, spectral_yes: bool | None,
              mapping_unit_ha: float) -> dict[str, Any]:
    """How a model answer relates to the pixel statistic behind its question.

    ``agrees`` is True when the model's yes/no (or number) matches what the statistic says, False when it
    contradicts it *or* cannot be compared (``comparison`` says which: "yes/no", "number", "unreadable",
    "no statistic").
    """
    out: dict[str, Any] = {"backing_statistic": template.backing_statistic, "value": value, "unit": template.unit,
                           "threshold": template.threshold, "statistic_says_yes": spectral_yes}
    if value is None or spectral_yes is None:
        return {**out, "agrees": False, "comparison": "no statistic"}
    match = _YES_NO.match(answer)
    if match:
        model_yes = match.group(1).lower() == "yes"
        return {**out, "agrees": model_yes == spectral_yes, "comparison": "yes/no", "model_says_yes": model_yes}
    number = _NUMBER.search(answer)
    if number:
        stated = float(number.group(1))
        tolerance = max(NUMERIC_TOLERANCE * abs(value), mapping_unit_ha)
        return {**out, "agrees": abs(stated - value) <= tolerance, "comparison": "number", "model_value": stated}
    return {**out, "agrees": False, "comparison": "unreadable"}
