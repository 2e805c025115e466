"""RSVQA accuracy by question type (GeoChat setting; spec section 6.1).

Ground truth: records with a question id, a question type and the answer; predictions: records
with the same id and the model's free-text answer. Field names are looked up in this order:

    id:      question_id, id
    type:    type, category, question_type
    answer:  ground truth: answer, ground_truth, gt, label; prediction: answer, text, prediction, output

Free-text answers are normalised before the exact comparison (`normalise_answer`):
lower-case, punctuation stripped; when the ground truth is "yes"/"no" the first yes/no word of
the prediction is taken ("Yes, there is a road." -> "yes"); when it is "rural"/"urban", the first
of those words; number words become digits ("two" -> "2").

The average is reported two ways, as on the UniRS project page:
* `average_weighted`: correct / total over the selected types (the VLM rows of the RSVQA
  tables, e.g. UniRS 92.21 = (2708 + 3709 + 90) / 7057 on RSVQA-LR);
* `average_of_types`: the plain mean of the per-type accuracies (the expert-model rows).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import EvalFormatError, format_table, get_field, read_records

__all__ = ["QUESTION_TYPES", "canonical_type", "load_rsvqa", "normalise_answer", "rsvqa_table", "score_rsvqa"]

ID_FIELDS = ("question_id", "id")
TYPE_FIELDS = ("type", "category", "question_type")
GT_FIELDS = ("answer", "ground_truth", "gt", "label")
PRED_FIELDS = ("answer", "text", "prediction", "output")

# Canonical type names, in table order. The GeoChat/UniRS RSVQA-LR setting uses the first three.
QUESTION_TYPES = ("presence", "comparison", "rural_urban", "count", "area")
_TYPE_ALIASES = {
    "presence": "presence",
    "comp": "comparison",
    "comparison": "comparison",
    "compare": "comparison",
    "rural_urban": "rural_urban",
    "ruralurban": "rural_urban",
    "rural/urban": "rural_urban",
    "rural urban": "rural_urban",
    "rural-urban": "rural_urban",
    "count": "count",
    "area": "area",
}
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}


def canonical_type(value: str) -> str:
    key = str(value).strip().lower()
    return _TYPE_ALIASES.get(key, key.replace(" ", "_"))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower())


def normalise_answer(prediction: str, ground_truth: str | None = None) -> str:
    """Map a free-text answer to the answer vocabulary of `ground_truth` (see module docstring)."""
    words = [_NUMBER_WORDS.get(w, w) for w in _words(str(prediction))]
    gt = " ".join(_NUMBER_WORDS.get(w, w) for w in _words(str(ground_truth))) if ground_truth is not None else None
    if gt in ("yes", "no"):
        for w in words:
            if w in ("yes", "no"):
                return w
    if gt in ("rural", "urban"):
        for w in words:
            if w in ("rural", "urban"):
                return w
    return " ".join(words)


def load_rsvqa(path: str | Path, *, prediction: bool) -> dict[str, dict[str, Any]]:
    """{question_id (str): {"type": ..., "answer": ...}} from a ground-truth or prediction file."""
    out: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(read_records(path)):
        where = f"{path}: record {i}"
        qid = str(get_field(rec, ID_FIELDS, where=where))
        answer = get_field(rec, PRED_FIELDS if prediction else GT_FIELDS, where=where)
        if isinstance(answer, list):
            if len(answer) != 1:
                raise EvalFormatError(f"{where}: expected one answer, got {len(answer)}")
            answer = answer[0]
        if not isinstance(answer, (str, int, float)):
            raise EvalFormatError(f"{where}: answer must be text, got {type(answer).__name__}")
        qtype = get_field(rec, TYPE_FIELDS, where=where, required=not prediction)
        if qid in out:
            raise EvalFormatError(f"{where}: duplicate question id {qid!r}")
        out[qid] = {"type": canonical_type(qtype) if qtype is not None else None, "answer": str(answer)}
    return out


def score_rsvqa(
    ground_truth: Mapping[str, Mapping[str, Any]],
    predictions: Mapping[str, Mapping[str, Any] | str],
    types: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Accuracy (%) per question type and the two averages.

    types: the types to report (default: every type in the ground truth, in `QUESTION_TYPES`
    order). Questions of other types are ignored and counted in `ignored`. A question without a
    prediction counts as wrong and is counted in `missing`.
    """
    present = {rec["type"] for rec in ground_truth.values()}
    if types is None:
        selected = [t for t in QUESTION_TYPES if t in present] + sorted(present - set(QUESTION_TYPES))
    else:
        selected = [canonical_type(t) for t in types]
    stats = {t: {"correct": 0, "total": 0} for t in selected}
    missing = ignored = 0
    details = []
    for qid, rec in ground_truth.items():
        qtype = rec["type"]
        if qtype not in stats:
            ignored += 1
            continue
        pred = predictions.get(qid)
        if isinstance(pred, Mapping):
            pred = pred.get("answer")
        stats[qtype]["total"] += 1
        if pred is None:
            missing += 1
            ok = False
            norm = None
        else:
            norm = normalise_answer(pred, rec["answer"])
            ok = norm == normalise_answer(rec["answer"])
        stats[qtype]["correct"] += int(ok)
        details.append(
            {
                "question_id": qid,
                "type": qtype,
                "ground_truth": rec["answer"],
                "prediction": pred,
                "normalised": norm,
                "correct": ok,
            }
        )
    per_type = {
        t: {**s, "accuracy": 100.0 * s["correct"] / s["total"] if s["total"] else None} for t, s in stats.items()
    }
    scored = [s for s in per_type.values() if s["total"]]
    total = sum(s["total"] for s in scored)
    correct = sum(s["correct"] for s in scored)
    return {
        "task": "rsvqa",
        "per_type": per_type,
        "average_weighted": 100.0 * correct / total if total else None,
        "average_of_types": sum(s["accuracy"] for s in scored) / len(scored) if scored else None,
        "correct": correct,
        "total": total,
        "missing": missing,
        "ignored": ignored,
        "details": details,
    }


def rsvqa_table(result: Mapping[str, Any], types: Sequence[str] | None = None) -> str:
    types = list(types or result["per_type"])
    header = [t.replace("_", "/") for t in types] + ["Avg. (weighted)", "Avg. (mean of types)", "questions"]
    acc = [result["per_type"][t]["accuracy"] for t in types]
    row = [a if a is not None else "-" for a in acc]
    row += [result["average_weighted"], result["average_of_types"], result["total"]]
    return format_table(header, [row])
