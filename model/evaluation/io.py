"""Small file helpers shared by the scorers: JSON / JSON-lines reading, field lookup, tables."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["EvalFormatError", "format_table", "get_field", "read_records", "write_json", "write_jsonl"]


class EvalFormatError(ValueError):
    """A prediction or ground-truth file is malformed; the message names the file and record."""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from a JSON list, JSON lines, or a JSON object.

    A JSON object whose values are all objects is read as {id: record} (each record gets an "id"
    field if it has none); one whose values are all strings or lists as {id: value} (records
    {"id": key, "value": value}); any other object is a single record.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return []
    data: Any = None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
    if data is None:
        return _read_json_lines(path, text)
    if isinstance(data, dict):
        values = list(data.values())
        if values and all(isinstance(v, dict) for v in values):
            return [{"id": key, **value} if "id" not in value else dict(value) for key, value in data.items()]
        if values and all(isinstance(v, (str, list)) for v in values):
            return [{"id": key, "value": value} for key, value in data.items()]
        return [data]
    if not isinstance(data, list):
        raise EvalFormatError(f"{path}: expected a list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise EvalFormatError(f"{path}: record {i}: expected a JSON object, got {type(rec).__name__}")
    return data


def _read_json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalFormatError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise EvalFormatError(f"{path}: line {lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def get_field(record: Mapping[str, Any], names: Sequence[str], *, where: str, required: bool = True) -> Any:
    """First present field of `names`; EvalFormatError naming `where` (file + record) if none is."""
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    if required:
        raise EvalFormatError(f"{where}: none of the fields {list(names)} is present")
    return None


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Markdown table; floats with two decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in body)) if body else len(str(h)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in body]
    return "\n".join(lines)
