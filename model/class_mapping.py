"""Free text -> class name: the one mapper used by `UniRS.classify_sequence` and by the ERA scorer.

The model answers a video question in free text ("This is a video about police chase."); the
released UniRS code has no mapping step (spec section 6.1: "mapping them to class names is an
external step"), so this module defines it once. `match_class` tries, in order:

1. **exact**: the normalised text equals a normalised class name or alias;
2. **substring**: class names / aliases occurring in the text as whole words; the longest match
   wins, ties go to the earliest position in the text;
3. **fuzzy**: the class with the largest share of its (lightly stemmed) tokens found in the text;
   ties are broken by the character similarity (`difflib.SequenceMatcher` ratio) between a class
   form and the best same-length window of words of the text, then by class order.

Every answer maps to some class; the method is returned so that `fuzzy` hits can be audited.
The score is 1.0 for exact and substring hits and the window similarity in [0, 1] for fuzzy ones.

Normalisation: lower-case; "_", "-", "/" become spaces; other punctuation is dropped.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ERA_ALIASES", "ERA_CLASSES", "ClassMatch", "match_class", "normalise_label"]

# The 25 ERA classes (Mou et al. 2020) in the order of the UniRS result table.
ERA_CLASSES = (
    "post-earthquake",
    "flood",
    "fire",
    "landslide",
    "mudslide",
    "traffic collision",
    "traffic congestion",
    "harvesting",
    "ploughing",
    "constructing",
    "police chase",
    "conflict",
    "baseball",
    "basketball",
    "boating",
    "cycling",
    "running",
    "soccer",
    "swimming",
    "car racing",
    "party",
    "concert",
    "parade/protest",
    "religious activity",
    "non-event",
)

# Extra surface forms accepted in steps 1-2, keyed by normalised class name. They apply to any
# class list that contains the key, so the worker's subset of ERA classes gets them too.
ERA_ALIASES: dict[str, tuple[str, ...]] = {
    "post earthquake": ("earthquake",),
    "fire": ("wildfire", "burning"),
    "parade protest": ("parade", "protest"),
    "non event": ("no event", "nonevent", "nothing happens"),
    "ploughing": ("plowing",),
    "mudslide": ("mud slide",),
    "landslide": ("land slide",),
    "car racing": ("car race",),
    "traffic collision": ("traffic accident", "car accident", "car crash"),
    "traffic congestion": ("traffic jam",),
    "constructing": ("construction",),
    "religious activity": ("religious",),
    "soccer": ("football",),
}


@dataclass(frozen=True)
class ClassMatch:
    """label: one of the classes; method: "exact" | "substring" | "fuzzy"; score in [0, 1]."""

    label: str
    method: str
    score: float


def normalise_label(text: str) -> str:
    text = str(text).lower().replace("_", " ").replace("-", " ").replace("/", " ")
    text = re.sub(r"[^a-z0-9 ]+", " ", text)
    return " ".join(text.split())


def _stem(token: str) -> str:
    for suffix in ("ing", "es", "s"):
        if token.endswith(suffix) and len(token) - len(suffix) >= 3:
            return token[: -len(suffix)]
    return token


def _window_similarity(form: str, words: list[str]) -> float:
    """Best difflib ratio between `form` and any window of as many words of the text."""
    n = max(1, len(form.split()))
    windows = [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))] or [""]
    return max(difflib.SequenceMatcher(None, form, w).ratio() for w in windows)


def match_class(text: str, classes: Sequence[str], aliases: Mapping[str, Sequence[str]] | None = None) -> ClassMatch:
    """Map free text to one of `classes` (see the module docstring). aliases: default `ERA_ALIASES`.

    Raises ValueError when `classes` is empty.
    """
    if not classes:
        raise ValueError("No classes to map to")
    aliases = ERA_ALIASES if aliases is None else aliases
    norm_text = normalise_label(text)
    forms: list[tuple[str, int]] = []  # (normalised surface form, class index)
    for k, name in enumerate(classes):
        base = normalise_label(name)
        forms.append((base, k))
        forms.extend((normalise_label(a), k) for a in aliases.get(base, ()))
    for form, k in forms:
        if norm_text == form:
            return ClassMatch(classes[k], "exact", 1.0)
    padded = f" {norm_text} "
    hits = [(-len(form), pos, k) for form, k in forms if form and (pos := padded.find(f" {form} ")) >= 0]
    if hits:
        return ClassMatch(classes[min(hits)[2]], "substring", 1.0)
    words = norm_text.split()
    text_tokens = {_stem(t) for t in words}
    best: tuple[tuple[float, float, int], int] | None = None
    for k, name in enumerate(classes):
        cls_tokens = {_stem(t) for t in normalise_label(name).split()} or {""}
        overlap = len(text_tokens & cls_tokens) / len(cls_tokens)
        similarity = max(_window_similarity(form, words) for form, j in forms if j == k)
        key = (overlap, similarity, -k)
        if best is None or key > best[0]:
            best = (key, k)
    (_, similarity, _), k = best
    return ClassMatch(classes[k], "fuzzy", round(similarity, 6))
