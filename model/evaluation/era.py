"""ERA event classification from free text: per-class accuracy and overall accuracy (spec section 6.2).

The model answers in free text ("This is a video about police chase."). `map_to_class` maps it
to one of the class names, in this order:

1. **exact**: the normalised text equals a normalised class name or alias;
2. **substring**: class names / aliases occurring in the text as whole words; the longest match
   wins, ties go to the earliest position in the text;
3. **fuzzy**: the class with the largest token overlap (|text ∩ class| / |class tokens|, tokens
   compared after light stemming), ties broken by `difflib.SequenceMatcher` ratio; if no token is
   shared at all, the class with the highest difflib ratio against the whole text.

So every answer maps to some class; the method used is recorded per sample so unmatched answers
can be audited (`fuzzy` hits are the suspicious ones).

Normalisation: lower-case; "_", "-", "/" become spaces; other punctuation is dropped.
Per-class accuracy = correct / samples of that ground-truth class (i.e. recall); OA = correct / all.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import EvalFormatError, format_table, get_field, read_records

__all__ = ["ERA_ALIASES", "ERA_CLASSES", "era_table", "load_era", "map_to_class", "normalise_label", "score_era"]

# The 25 ERA classes in the order of the UniRS table.
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

# Extra surface forms accepted in steps 1-2 (keys are normalised class names).
ERA_ALIASES: dict[str, tuple[str, ...]] = {
    "post earthquake": ("earthquake",),
    "parade protest": ("parade", "protest"),
    "non event": ("no event", "nonevent"),
    "ploughing": ("plowing",),
    "mudslide": ("mud slide",),
    "landslide": ("land slide",),
    "car racing": ("car race",),
    "traffic collision": ("traffic accident", "car accident", "car crash"),
    "traffic congestion": ("traffic jam",),
    "constructing": ("construction",),
    "religious activity": ("religious",),
}

ID_FIELDS = ("question_id", "id", "video", "video_id")
GT_FIELDS = ("label", "class", "answer", "ground_truth", "gt")
PRED_FIELDS = ("answer", "text", "prediction", "output")


def normalise_label(text: str) -> str:
    text = str(text).lower().replace("_", " ").replace("-", " ").replace("/", " ")
    text = re.sub(r"[^a-z0-9 ]+", " ", text)
    return " ".join(text.split())


def _stem(token: str) -> str:
    for suffix in ("ing", "es", "s"):
        if token.endswith(suffix) and len(token) - len(suffix) >= 3:
            return token[: -len(suffix)]
    return token


def map_to_class(text: str, classes: Sequence[str] = ERA_CLASSES, aliases: Mapping[str, Sequence[str]] | None = None):
    """Return (class name, method) with method in {"exact", "substring", "fuzzy"}."""
    if not classes:
        raise ValueError("No classes to map to")
    aliases = ERA_ALIASES if aliases is None else aliases
    norm_text = normalise_label(text)
    forms: list[tuple[str, str]] = []  # (normalised surface form, class)
    for cls in classes:
        base = normalise_label(cls)
        forms.append((base, cls))
        forms.extend((normalise_label(a), cls) for a in aliases.get(base, ()))
    for form, cls in forms:
        if norm_text == form:
            return cls, "exact"
    padded = f" {norm_text} "
    hits = []
    for form, cls in forms:
        pos = padded.find(f" {form} ")
        if form and pos >= 0:
            hits.append((-len(form), pos, cls))
    if hits:
        return min(hits)[2], "substring"
    text_tokens = {_stem(t) for t in norm_text.split()}
    best = None
    for cls in classes:
        cls_tokens = {_stem(t) for t in normalise_label(cls).split()}
        overlap = len(text_tokens & cls_tokens) / len(cls_tokens)
        ratio = difflib.SequenceMatcher(None, norm_text, normalise_label(cls)).ratio()
        key = (overlap, ratio)
        if best is None or key > best[0]:
            best = (key, cls)
    return best[1], "fuzzy"


def load_era(path: str | Path, *, prediction: bool) -> dict[str, str]:
    """{sample id: label or answer text} from a ground-truth or prediction file."""
    out: dict[str, str] = {}
    for i, rec in enumerate(read_records(path)):
        where = f"{path}: record {i}"
        sid = str(get_field(rec, ID_FIELDS, where=where))
        value = get_field(rec, PRED_FIELDS if prediction else GT_FIELDS, where=where)
        if not isinstance(value, str):
            raise EvalFormatError(f"{where}: expected text, got {type(value).__name__}")
        if sid in out:
            raise EvalFormatError(f"{where}: duplicate id {sid!r}")
        out[sid] = value
    return out


def score_era(
    ground_truth: Mapping[str, str], predictions: Mapping[str, str], classes: Iterable[str] | None = None
) -> dict[str, Any]:
    """Per-class accuracy (%), OA (%) and mean per-class accuracy; missing predictions count as wrong.

    classes: the label set (default `ERA_CLASSES`). Ground-truth labels are matched to it after
    normalisation (folder names such as "traffic_collision" work); an unknown label is an error.
    """
    classes = list(classes or ERA_CLASSES)
    by_norm = {normalise_label(c): c for c in classes}
    stats = {c: {"correct": 0, "total": 0} for c in classes}
    details = []
    missing = 0
    methods: dict[str, int] = {"exact": 0, "substring": 0, "fuzzy": 0}
    for sid, label in ground_truth.items():
        gt = by_norm.get(normalise_label(label))
        if gt is None:
            raise EvalFormatError(
                f"sample {sid!r}: ground-truth label {label!r} is not one of the {len(classes)} classes"
            )
        pred_text = predictions.get(sid)
        stats[gt]["total"] += 1
        if pred_text is None:
            missing += 1
            pred, method = None, None
        else:
            pred, method = map_to_class(pred_text, classes)
            methods[method] += 1
        ok = pred == gt
        stats[gt]["correct"] += int(ok)
        details.append(
            {"id": sid, "ground_truth": gt, "prediction": pred_text, "mapped": pred, "method": method, "correct": ok}
        )
    per_class = {
        c: {**s, "accuracy": 100.0 * s["correct"] / s["total"] if s["total"] else None} for c, s in stats.items()
    }
    total = sum(s["total"] for s in stats.values())
    correct = sum(s["correct"] for s in stats.values())
    scored = [s["accuracy"] for s in per_class.values() if s["accuracy"] is not None]
    return {
        "task": "era",
        "per_class": per_class,
        "overall_accuracy": 100.0 * correct / total if total else None,
        "mean_class_accuracy": sum(scored) / len(scored) if scored else None,
        "correct": correct,
        "total": total,
        "missing": missing,
        "mapping_methods": methods,
        "details": details,
    }


def era_table(result: Mapping[str, Any]) -> str:
    rows = [
        [c, s["accuracy"] if s["accuracy"] is not None else "-", s["total"]] for c, s in result["per_class"].items()
    ]
    rows.append(["OA", result["overall_accuracy"], result["total"]])
    rows.append(["mean per-class", result["mean_class_accuracy"], ""])
    return format_table(["class", "accuracy (%)", "samples"], rows)
