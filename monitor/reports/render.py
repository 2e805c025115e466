"""Jinja2 rendering of report emails: subject, plain text and HTML from the plain report objects.

HTML templates (``*.html``) are autoescaped, so area names, captions, answers and statistics can carry
any markup without it becoming markup; text templates are not (escaping would show ``&amp;`` to a
reader). Subjects go through :func:`~monitor.reports.sanitize.header_text` because a header is neither.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from eo.change_classes import format_hectares
from monitor.reports.context import AnalysisReport, InlineImage, confidence_tier
from monitor.reports.sanitize import header_text, slug

DEFAULT_TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
ATTRIBUTION = "Contains modified Copernicus Sentinel data"


@dataclass
class Attachment:
    filename: str
    maintype: str
    subtype: str
    data: bytes


@dataclass
class RenderedEmail:
    subject: str
    text: str
    html: str
    images: list[InlineImage] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "—"


def _day(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d") if value else "—"


def _pct(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.0f} %"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} %"


def _ha(value: float | None) -> str:
    return format_hectares(value)


def _confidence(value: float | None) -> str:
    return "—" if value is None else f"{confidence_tier(value)} ({value:.2f})"


@functools.lru_cache(maxsize=4)
def environment(templates_dir: Path | None = None) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir or DEFAULT_TEMPLATES)),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False, default=False),
        undefined=jinja2.StrictUndefined,  # a misspelt field is an error in tests, not a blank in an email
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(when=_when, day=_day, pct=_pct, percent=_percent, ha=_ha, confidence=_confidence)
    env.globals["ATTRIBUTION"] = ATTRIBUTION
    return env


def _render(name: str, context: dict[str, Any], templates_dir: Path | None) -> RenderedEmail:
    env = environment(templates_dir)
    subject = header_text(env.get_template(f"{name}_subject.txt").render(**context))
    context = {**context, "subject": subject}
    return RenderedEmail(
        subject=subject,
        text=env.get_template(f"{name}.txt").render(**context),
        html=env.get_template(f"{name}.html").render(**context),
    )


def _geojson(features: list[dict[str, Any]], filename: str) -> Attachment:
    body = json.dumps({"type": "FeatureCollection", "features": features}, ensure_ascii=False, indent=1)
    return Attachment(filename, "application", "geo+json", body.encode("utf-8"))


def render_alert(report: AnalysisReport, recipient: str, *, templates_dir: Path | None = None,
                 links: Any = None) -> RenderedEmail:
    """The immediate alert about one analysis, for one recipient (``templates_dir``: the setting
    ``reports.templates_dir``; None = the bundled ``templates/``; ``links``: the recipient's
    :class:`monitor.reports.links.EmailLinks`, None = no web links)."""
    email = _render("alert", {"r": report, "recipient": recipient, "links": links}, templates_dir)
    email.images = list(report.images)
    email.attachments.append(_geojson(
        report.regions_geojson["features"], f"changes-{slug(report.area_name)}-analysis-{report.analysis_id}.geojson"
    ))
    return email


def render_digest(digest: Any, recipient: str, *, templates_dir: Path | None = None,
                  links: Any = None) -> RenderedEmail:
    """The daily digest of one area (a :class:`monitor.reports.digest.DigestReport`), for one recipient."""
    email = _render("digest", {"d": digest, "recipient": recipient, "links": links}, templates_dir)
    email.images = [img for report in digest.detailed for img in report.images]
    features = [f for report in digest.analyses for f in report.regions_geojson["features"]]
    email.attachments.append(_geojson(features, f"changes-{slug(digest.area_name)}-digest-{digest.digest_id}.geojson"))
    return email
