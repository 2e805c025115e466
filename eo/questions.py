"""Question templates: what an analysis is asked about a pair, and how the pixels answer it.

The default set lives in ``eo/data/questions.json`` (a data file, so it can be reviewed and
versioned without reading code). Each template has

- ``id`` (what ``Area.questions`` and ``Analysis.question_set`` name),
- ``text`` (the question put to the model and shown in reports),
- ``backing_statistic`` (a key of the spectral metrics that answers it) and its ``unit``,
- ``answer``: the rule turning that statistic into an answer (``yes_if_at_least`` a threshold) and the
  sentences to say for yes / no / not computable.

An empty selection means every default template.

The question set an analysis records (``Analysis.question_set``, part of its idempotency key) is
``"<sorted ids>@<version>"``, the version being a digest of the templates' content
(:func:`templates_version`): editing a question, threshold or answer sentence makes a new question set
by itself, with no number to remember to bump; editing the file's ``description`` does not.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

DATA_FILE = "questions.json"


class UnknownQuestion(KeyError):
    """A template id that is not in the data file."""


@dataclass(frozen=True)
class QuestionTemplate:
    id: str
    text: str
    backing_statistic: str
    unit: str
    threshold: float
    yes: str
    no: str
    unavailable: str

    def answer_from(self, value: float | None, reason: str | None = None) -> tuple[str, bool | None]:
        """The answer the statistic gives, and its yes/no reading (None when it cannot be computed)."""
        if value is None:
            return self.unavailable.format(reason=reason or f"{self.backing_statistic} was not computed"), None
        says_yes = value >= self.threshold
        text = (self.yes if says_yes else self.no).format(value=value, threshold=self.threshold, unit=self.unit)
        return text, says_yes


def _parse(entry: dict[str, Any]) -> QuestionTemplate:
    answer = entry["answer"]
    if answer["rule"] != "yes_if_at_least":
        raise ValueError(f"question {entry['id']!r}: unknown answer rule {answer['rule']!r}")
    return QuestionTemplate(
        id=entry["id"], text=entry["text"], backing_statistic=entry["backing_statistic"], unit=entry["unit"],
        threshold=float(answer["threshold"]), yes=answer["yes"], no=answer["no"],
        unavailable=answer["unavailable"],
    )


def parse_file(text: str) -> tuple[tuple[QuestionTemplate, ...], str]:
    """The templates of a questions file's JSON ``text`` and their version (12 hex digits of the sha256 of
    the canonical JSON of ``templates``). ValueError on an unknown rule or duplicate ids."""
    raw = json.loads(text)
    templates = tuple(_parse(e) for e in raw["templates"])
    ids = [t.id for t in templates]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{DATA_FILE}: duplicate template ids in {ids}")
    canonical = json.dumps(raw["templates"], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return templates, hashlib.sha256(canonical.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def _load() -> tuple[tuple[QuestionTemplate, ...], str]:
    return parse_file(resources.files("eo").joinpath("data", DATA_FILE).read_text(encoding="utf-8"))


def templates_version() -> str:
    """The content version of the default templates (see the module docstring)."""
    return _load()[1]


def question_set_id(questions: Iterable[str] | None, version: str | None = None) -> str:
    """``Analysis.question_set`` of an area asking ``questions`` (ids; empty: every default):
    ``"id1,id2@<version>"``, the version :func:`templates_version` unless given."""
    return ",".join(sorted(set(questions or []))) + f"@{version or templates_version()}"


def load_templates() -> list[QuestionTemplate]:
    """Every default template, in file order."""
    return list(_load()[0])


def templates_for(ids: list[str] | tuple[str, ...] | None) -> list[QuestionTemplate]:
    """The templates named by ``ids`` (file order); an empty or missing selection means all defaults."""
    templates = load_templates()
    if not ids:
        return templates
    by_id = {t.id: t for t in templates}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise UnknownQuestion(f"unknown question template(s) {unknown}; known: {sorted(by_id)}")
    wanted = set(ids)
    return [t for t in templates if t.id in wanted]


def ids_from_question_set(question_set: str | None) -> list[str]:
    """Template ids of an ``Analysis.question_set`` (``"id1,id2@<version>"``, :func:`question_set_id`)."""
    if not question_set:
        return []
    ids_part = question_set.rsplit("@", 1)[0]
    return [i for i in ids_part.split(",") if i]
