"""ERA event classification from free text: per-class accuracy and overall accuracy (spec section 6.2).

The model answers in free text ("This is a video about police chase."); `map_to_class` maps it
to one of the class names with `model.class_mapping.match_class`, the same mapper
`UniRS.classify_sequence` uses (exact, then whole-word substring, then fuzzy), and records the
method per sample so that `fuzzy` hits can be audited.

Per-class accuracy = correct / samples of that ground-truth class (i.e. recall); OA = correct / all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..class_mapping import ERA_ALIASES, ERA_CLASSES, match_class, normalise_label
from .io import EvalFormatError, format_table, get_field, read_records

__all__ = ["ERA_ALIASES", "ERA_CLASSES", "era_table", "load_era", "map_to_class", "normalise_label", "score_era"]

ID_FIELDS = ("question_id", "id", "video", "video_id")
GT_FIELDS = ("label", "class", "answer", "ground_truth", "gt")
PRED_FIELDS = ("answer", "text", "prediction", "output")


def map_to_class(text: str, classes: Sequence[str] = ERA_CLASSES, aliases: Mapping[str, Sequence[str]] | None = None):
    """Return (class name, method) with method in {"exact", "substring", "fuzzy"} (`match_class`)."""
    match = match_class(text, classes, aliases)
    return match.label, match.method


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
