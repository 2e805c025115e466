"""Making user- and model-provided text safe for places that are not HTML (headers, file names).

HTML is protected by Jinja2 autoescaping; these helpers cover what autoescaping does not: an area name
or a model caption that reaches the Subject header must not be able to start a new header (CR/LF), and
one that reaches a file name must not be able to leave the directory.
"""

from __future__ import annotations

import re
import unicodedata

# C0/C1 controls, DEL, and the Unicode line/paragraph separators some mail software treats as breaks.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SLUG = re.compile(r"[^A-Za-z0-9]+")


def header_text(value: object, max_length: int = 150) -> str:
    """One clean line for an email header: controls become spaces, whitespace collapses, length is capped.

    The cap keeps a model that rambles from producing a Subject nobody can read; the ellipsis says that
    something was cut.
    """
    text = _CONTROL.sub(" ", "" if value is None else str(value))
    # Category Cf (format characters: bidi overrides, zero-width joiners) can disguise a subject.
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    text = " ".join(text.split())
    if len(text) > max_length:
        text = text[: max_length - 1].rstrip() + "…"
    return text


def slug(value: object, max_length: int = 40) -> str:
    """ASCII letters, digits and dashes only: safe in any file name and any Content-Disposition."""
    ascii_text = unicodedata.normalize("NFKD", str(value)).encode("ascii", "ignore").decode("ascii")
    return _SLUG.sub("-", ascii_text).strip("-").lower()[:max_length].strip("-") or "area"
