"""LEVIR-CC change captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (spec section 6.1).

References can be given as
* the official LEVIR-CC file (`LevirCCcaptions.json`: {"images": [{"filename", "split",
  "sentences": [{"raw", "tokens"}]}]}); one item per image pair of the chosen split, id = the
  file name without extension;
* {id: [caption, ...]};
* records with an id (`question_id`, `id`, `image`) and the captions (`references`, `captions`,
  `ground_truth`, `answer`; a string or a list). Records sharing an id are merged, so a
  LLaVA-style file with one record per caption works.

Predictions: records with the same id and the caption (`caption`, `answer`, `text`, `prediction`).
Scores are returned on the coco scale and printed x100 in the table, as in the LEVIR-CC papers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .io import EvalFormatError, format_table, get_field, read_records
from .metrics import DEFAULT_METRICS, caption_metrics

__all__ = ["caption_table", "load_caption_predictions", "load_caption_references", "score_captions"]

ID_FIELDS = ("question_id", "id", "image")
REF_FIELDS = ("references", "captions", "ground_truth", "answer", "value")
PRED_FIELDS = ("caption", "answer", "text", "prediction", "output")


def _stem_id(value: Any) -> str:
    if isinstance(value, list):
        value = "###".join(map(str, value))
    return str(value)


def load_caption_references(path: str | Path, split: str = "test", field: str = "raw") -> dict[str, list[str]]:
    """{id: [reference, ...]}; `split`/`field` ("raw" or "tokens") apply to the official LEVIR-CC file."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else None
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        refs: dict[str, list[str]] = {}
        for i, img in enumerate(data["images"]):
            where = f"{path}: images[{i}]"
            if not isinstance(img, dict) or "filename" not in img or "sentences" not in img:
                raise EvalFormatError(f"{where}: expected an object with 'filename' and 'sentences'")
            if split and img.get("split") != split:
                continue
            sents = []
            for j, s in enumerate(img["sentences"]):
                if field == "tokens":
                    if not isinstance(s.get("tokens"), list):
                        raise EvalFormatError(f"{where}.sentences[{j}]: no 'tokens' list")
                    sents.append(" ".join(s["tokens"]))
                else:
                    if not isinstance(s.get("raw"), str):
                        raise EvalFormatError(f"{where}.sentences[{j}]: no 'raw' string")
                    sents.append(s["raw"].strip())
            if not sents:
                raise EvalFormatError(f"{where}: no reference sentences")
            refs[Path(img["filename"]).stem] = sents
        if not refs:
            raise EvalFormatError(f"{path}: no images in split {split!r}")
        return refs
    refs = {}
    for i, rec in enumerate(read_records(path)):
        where = f"{path}: record {i}"
        rid = _stem_id(get_field(rec, ID_FIELDS, where=where))
        value = get_field(rec, REF_FIELDS, where=where)
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise EvalFormatError(f"{where}: references must be a string or a non-empty list of strings")
        refs.setdefault(rid, []).extend(v.strip() for v in values)
    return refs


def load_caption_predictions(path: str | Path) -> dict[str, str]:
    preds: dict[str, str] = {}
    for i, rec in enumerate(read_records(path)):
        where = f"{path}: record {i}"
        rid = _stem_id(get_field(rec, ID_FIELDS, where=where))
        value = get_field(rec, PRED_FIELDS, where=where)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise EvalFormatError(f"{where}: the caption must be a string")
        if rid in preds:
            raise EvalFormatError(f"{where}: duplicate id {rid!r}")
        preds[rid] = value
    return preds


def score_captions(
    references: Mapping[str, list[str]],
    predictions: Mapping[str, str],
    tokenizer: str = "ptb",
    metrics: Iterable[str] = DEFAULT_METRICS,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Score predictions against references. Missing predictions are an error unless `allow_missing`
    (then they are scored as empty captions and counted)."""
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if extra:
        raise EvalFormatError(f"{len(extra)} predictions have no references, e.g. {extra[:3]}")
    if missing and not allow_missing:
        raise EvalFormatError(f"{len(missing)} items have no prediction, e.g. {missing[:3]} (use --allow-missing)")
    candidates = {k: predictions.get(k, "") for k in references}
    scores = caption_metrics(references, candidates, tokenizer=tokenizer, metrics=metrics)
    per_item = scores.pop("per_item")
    details = [
        {"id": k, "prediction": candidates[k], "references": references[k], **per_item.get(str(k), {})}
        for k in references
    ]
    return {
        "task": "change_captioning",
        "scores": scores,
        "items": len(references),
        "missing": len(missing),
        "tokenizer": tokenizer,
        "details": details,
    }


def caption_table(result: Mapping[str, Any]) -> str:
    names = list(result["scores"])
    return format_table([*names, "items"], [[100.0 * result["scores"][n] for n in names] + [result["items"]]])
