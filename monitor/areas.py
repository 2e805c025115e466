"""Watched areas: create, change, list and export them (the CLI in ``areas_cli`` is a thin layer over this)."""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from email_validator import EmailNotValidError, validate_email
from geoalchemy2.shape import from_shape, to_shape
from shapely.geometry import MultiPolygon
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import AlertFrequency, Area, AreaStatus, PairingPolicy
from eo.change_classes import CLASS_ORDER
from monitor.area_options import ALERT_ON, AreaOptions
from monitor.geometry import AreaGeometryError, ParsedArea, Problem, geodesic_area_km2, problem_report, to_feature

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class AreaError(ValueError):
    """A request about areas that cannot be carried out; the message says why."""


# How a message names the ways out: the CLI's flags by default. The API passes its own query parameters
# (web/api_areas.py), so a web user is not told about flags the form has not got. A None value = that way
# does not exist for the caller: its hint is left out.
CLI_HINTS: Mapping[str, str | None] = {
    "name": "--name", "union": "--union", "keep_unknown": "--keep-unknown-properties",
    "name_key": "--name-property KEY",
}


def split_properties(props: dict[str, Any], where: str, *, keep_unknown: bool = False,
                     name_key: str = AreaOptions.NAME_KEY, hints: Mapping[str, str | None] = CLI_HINTS
                     ) -> dict[str, Any]:
    """The free attributes of a feature (its ``attributes`` object); any other key must be an accepted one.

    An unknown key is refused with the accepted list (a misspelled ``recipient`` must not silently leave an
    area that alerts nobody); with ``keep_unknown`` it is kept as an attribute instead. Feature ids of GIS
    exports (:data:`AreaOptions.FEATURE_ID_KEYS`: QGIS' ``fid``, ``ogc_fid``, ``OBJECTID``...) are not
    refused: dropped, or kept as attributes with ``keep_unknown``; ``name_key`` (the property naming the
    area) is a setting. A suggested key is only ever a setting (``recipent`` → ``recipients``, compared
    without case), never ``id`` for ``fid``. ``hints``: how the refusal names the options (:data:`CLI_HINTS`).
    """
    attributes = props.get(AreaOptions.ATTRIBUTES_KEY) or {}
    if not isinstance(attributes, dict):
        raise AreaError(f"{where}: 'attributes' must be an object, got {attributes!r}")
    settable = {*AreaOptions.accepted_keys(), name_key}
    extra = [k for k in props if k not in settable and k not in AreaOptions.EXPORT_ONLY_KEYS]
    unknown = [k for k in extra if not AreaOptions.is_feature_id(k)]
    if unknown and not keep_unknown:
        lowered = {k.lower(): k for k in settable}
        suggested = [f"{k!r} (did you mean {lowered[m[0]]!r}?)"
                 if (m := difflib.get_close_matches(k.lower(), lowered, n=1)) else repr(k) for k in unknown]
        ways = [f"{how} {what}" for how, what in ((hints.get("keep_unknown"), "stores others as attributes"),
                                                  (hints.get("name_key"), "names the areas from another property"))
                if how]
        raise AreaError(
            f"{where}: unknown propert{'y' if len(unknown) == 1 else 'ies'} {', '.join(suggested)}; accepted: "
            f"{', '.join(AreaOptions.accepted_keys())}" + (f" ({'; '.join(ways)})" if ways else "")
        )
    return {**attributes, **{k: props[k] for k in extra if keep_unknown}}


def alert_targets(area: Area) -> list[str]:
    """Where an area's alerts go: its email recipients (the place to add other channels, e.g. webhooks)."""
    return list(area.recipients or [])


def alerts_nobody(area: Area) -> bool:
    """True when the area sends alerts (immediately or in a digest) but has nowhere to send them."""
    return area.alert_frequency != AlertFrequency.OFF and not alert_targets(area)


def alerts_nobody_warning(area: Area) -> str:
    return (f"area {area.name!r} sends {area.alert_frequency.value} alerts but has no recipient: add one with "
            f"`unirs-monitor areas update {area.name!r} --recipient you@example.org` (or --frequency off)")


def validate_name(name: Any, hints: Mapping[str, str | None] = CLI_HINTS) -> str:
    """The name with runs of whitespace collapsed; refused unless printable Unicode, 1–200 characters.
    ``hints``: how the refusal of a missing name names the name option (:data:`CLI_HINTS`)."""
    if not isinstance(name, str) or not name.strip():
        option = f"{hints['name']}, or " if hints.get("name") else ""
        raise AreaError(f"an area needs a non-empty name ({option}a 'name' property per feature)")
    if _CONTROL.search(name):
        raise AreaError(f"area name {name!r} contains control characters (line breaks, tabs…)")
    name = " ".join(name.split())
    bad = _unprintable(name)
    if bad:
        raise AreaError(f"area name {name!r} contains {bad}; names must be printable Unicode")
    if len(name) > 200:
        raise AreaError(f"area name is {len(name)} characters long; the maximum is 200")
    return name


def _unprintable(text: str) -> str | None:
    """What makes ``text`` not printable Unicode (invalid UTF-8 from argv, lone surrogates, format or
    private-use characters such as U+202E), or None."""
    for index, ch in enumerate(text):
        if ch.isprintable():
            continue
        if "\udc80" <= ch <= "\udcff":
            return f"invalid UTF-8 (byte 0x{ord(ch) - 0xDC00:02x} at character {index})"
        if "\ud800" <= ch <= "\udfff":
            return f"a lone surrogate U+{ord(ch):04X} at character {index}"
        return f"the non-printable character U+{ord(ch):04X} at character {index}"
    return None


def _storable(value: Any, where: str) -> None:
    """Refuse JSON that PostgreSQL JSONB cannot hold (NaN/Infinity, NUL, lone surrogates)."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (ValueError, TypeError) as exc:
        raise AreaError(f"{where} cannot be stored: {exc}") from None
    if "\x00" in text or "\\u0000" in text:
        raise AreaError(f"{where} cannot be stored: contains a NUL character")


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AreaError(f"{name} must be a number, got {value!r}") from None
    if number != number:
        raise AreaError(f"{name} must be a number, got NaN")
    return number


def validate_recipients(recipients: list[str]) -> list[str]:
    clean = []
    for r in recipients:
        if not isinstance(r, str) or _CONTROL.search(r):
            raise AreaError(f"recipient {r!r} is not a valid email address (control characters)")
        try:
            clean.append(validate_email(r.strip(), check_deliverability=False).normalized)
        except EmailNotValidError as exc:
            raise AreaError(f"recipient {r!r} is not a valid email address: {exc}") from None
    return sorted(set(clean), key=clean.index)


def _validate_options(opts: AreaOptions) -> None:
    if opts.max_cloud_cover is not None and not 0 <= _number(opts.max_cloud_cover, "max cloud cover") <= 100:
        raise AreaError(f"max cloud cover must be a percentage in [0, 100], got {opts.max_cloud_cover}")
    if opts.min_clear_fraction is not None and not 0 <= _number(opts.min_clear_fraction, "minimum clear fraction") <= 1:
        raise AreaError(f"minimum clear fraction must be in [0, 1], got {opts.min_clear_fraction}")
    if opts.min_covered_fraction is not None and not 0 <= _number(opts.min_covered_fraction,
                                                                  "minimum covered fraction") <= 1:
        raise AreaError(f"minimum covered fraction must be in [0, 1], got {opts.min_covered_fraction}")
    if opts.min_alert_hectares is not None and not 0 <= _number(opts.min_alert_hectares,
                                                                "minimum alert hectares") < float("inf"):
        raise AreaError(f"minimum alert hectares must be ≥ 0, got {opts.min_alert_hectares}")
    if opts.alert_frequency is not None and (not isinstance(opts.alert_frequency, str)
                                             or opts.alert_frequency not in {f.value for f in AlertFrequency}):
        raise AreaError(f"alert frequency must be one of {[f.value for f in AlertFrequency]}, got "
                        f"{opts.alert_frequency!r}")
    if opts.pairing_policy is not None and (not isinstance(opts.pairing_policy, str)
                                            or opts.pairing_policy not in {p.value for p in PairingPolicy}):
        raise AreaError(
            f"pairing policy must be one of {[p.value for p in PairingPolicy]}, got {opts.pairing_policy!r}"
        )
    if opts.collections is not None and (
        not isinstance(opts.collections, list | tuple) or not opts.collections
        or not all(isinstance(c, str) and c.strip() for c in opts.collections)
    ):
        raise AreaError("collections must be a non-empty list of collection ids")
    for key in ("recipients", "questions", "alert_classes"):
        if getattr(opts, key) is not None and not isinstance(getattr(opts, key), list | tuple):
            raise AreaError(f"{key} must be a list, got {getattr(opts, key)!r}")
    for key in ("collections", "recipients", "questions"):
        for value in getattr(opts, key) or []:
            bad = _unprintable(value) if isinstance(value, str) else None
            if bad:
                raise AreaError(f"{key}: {value!r} contains {bad}")
    if opts.questions:
        _validate_questions(opts.questions)
    if opts.alert_on is not None and opts.alert_on not in ALERT_ON:
        raise AreaError(f"alert on must be one of {list(ALERT_ON)}, got {opts.alert_on!r}")
    if opts.alert_classes is not None:
        unknown = [c for c in opts.alert_classes if not isinstance(c, str) or c not in CLASS_ORDER]
        if unknown or not opts.alert_classes:
            raise AreaError(f"alert classes must be a non-empty list of {list(CLASS_ORDER)}, got "
                            f"{list(opts.alert_classes)!r}")


def _validate_questions(ids: list[str]) -> None:
    try:
        from eo.questions import load_templates
    except ImportError:  # templates ship with the analysis workers; without them any id is accepted
        return
    known = {t.id for t in load_templates()}
    unknown = [q for q in ids if not isinstance(q, str) or q not in known]
    if unknown:
        raise AreaError(f"unknown question template(s) {unknown}; known: {sorted(known)}")


def _check_size(geom: MultiPolygon, where: str, limit: float) -> float:
    km2 = geodesic_area_km2(geom)
    if km2 > limit:
        raise AreaGeometryError(
            f"{where}: area is {km2:,.0f} km², above the maximum of {limit:,.0f} km² (setting UNIRS_MAX_AREA_KM2)"
        )
    return km2


def _apply(area: Area, opts: AreaOptions) -> None:
    _validate_options(opts)
    if opts.recipients is not None:
        area.recipients = validate_recipients(list(opts.recipients))
    if opts.alert_on is not None:
        area.alert_on = opts.alert_on
    if opts.alert_classes is not None:
        area.alert_classes = [c for c in CLASS_ORDER if c in opts.alert_classes]
    for key in ("collections", "questions"):
        if getattr(opts, key) is not None:
            setattr(area, key, [str(v).strip() for v in getattr(opts, key)])
    for key in ("max_cloud_cover", "min_clear_fraction", "min_covered_fraction", "min_alert_hectares"):
        if getattr(opts, key) is not None:
            setattr(area, key, float(getattr(opts, key)))
    if opts.alert_frequency is not None:
        area.alert_frequency = AlertFrequency(opts.alert_frequency)
    if opts.pairing_policy is not None:
        area.pairing_policy = PairingPolicy(opts.pairing_policy)


def add_areas(session: Session, parsed: list[ParsedArea], name: str | None, opts: AreaOptions, *,
              max_area_km2: float, keep_unknown: bool = False, owner_id: int | None = None,
              name_key: str = AreaOptions.NAME_KEY, problems: list[Problem] | None = None,
              union: bool = False, hints: Mapping[str, str | None] = CLI_HINTS) -> list[Area]:
    """Create one area per parsed geometry. All or nothing: any refusal rolls back the whole batch.
    ``max_area_km2`` is the setting of the same name (larger areas are refused).

    Feature properties other than :meth:`AreaOptions.accepted_keys` are refused unless ``keep_unknown``
    (see :func:`split_properties`); ``name_key`` is the property that names each area (default ``name``;
    e.g. ``fid`` or ``NAME`` when asked for). ``owner_id`` None = the operator account
    (core.models.OPERATOR_EMAIL).

    Every feature is checked before anything is refused: the problems (with those ``parse_areas`` put in
    ``problems``) are raised together as one AreaError, one line per problem naming the feature and the fix.
    Options given for the whole batch (``name``, ``opts``) are checked first and refused on their own.
    ``union``: ``parsed`` is the merge of every feature (``parse_areas(union=True)``), which ``name`` names.
    ``hints``: how the messages name the options (:data:`CLI_HINTS`; the API passes its query parameters).
    """
    problems = [] if problems is None else problems
    features = len(parsed) + len({number for number, _ in problems})
    if name is not None and not union and features > 1:
        union_hint = f"use {hints['union']}, or " if hints.get("union") else ""
        raise AreaError(f"{hints.get('name') or 'a name'} given but the input has {features} features; {union_hint}"
                        f"name each feature with a '{name_key}' property")
    if name is not None:
        name = validate_name(name, hints)
    _validate_options(opts)
    if opts.recipients is not None:
        validate_recipients(list(opts.recipients))
    created = []
    seen: dict[str, str] = {}
    for item in parsed:
        try:
            area = _new_area(session, item, name, opts, seen, max_area_km2=max_area_km2, keep_unknown=keep_unknown,
                             name_key=name_key, hints=hints)
        except (AreaError, AreaGeometryError) as exc:
            problems.append((item.number, str(exc)))
            continue
        if owner_id is not None:
            area.owner_id = owner_id
        session.add(area)
        created.append(area)
    if problems:
        raise AreaError(problem_report(problems))
    session.flush()
    for area in created:
        log.info("area %r added (id %d, %.2f km²)", area.name, area.id, area.area_km2)
    return created


def _new_area(session: Session, item: ParsedArea, name: str | None, opts: AreaOptions, seen: dict[str, str], *,
              max_area_km2: float, keep_unknown: bool, name_key: str, hints: Mapping[str, str | None]) -> Area:
    """The area of one feature (not yet added to the session); AreaError names the feature and the fix."""
    attributes = split_properties(item.properties, item.source, keep_unknown=keep_unknown, name_key=name_key,
                                  hints=hints)
    raw_name = name if name is not None else item.properties.get(name_key)
    if isinstance(raw_name, int) and not isinstance(raw_name, bool) and name_key != AreaOptions.NAME_KEY:
        raw_name = str(raw_name)  # --name-property fid: a number is a fine name when asked for
    try:
        area_name = validate_name(raw_name, hints)
    except AreaError as exc:
        option = hints.get("name_key")
        hint = "" if name_key == AreaOptions.NAME_KEY or not option else f" ({option.replace('KEY', name_key)})"
        raise AreaError(f"{item.source}: {exc}{hint}") from None
    if area_name in seen:
        raise AreaError(f"{item.source}: {seen[area_name]} is also named {area_name!r}; area names must be unique")
    if session.scalar(select(Area.id).where(Area.name == area_name)) is not None:
        raise AreaError(f"{item.source}: an area named {area_name!r} already exists (rename the feature, or "
                        "update or remove that area)")
    seen[area_name] = item.source
    _storable(item.properties, f"{item.source}: properties")
    area = Area(
        name=area_name,
        geom=from_shape(item.geometry, srid=4326),
        area_km2=_check_size(item.geometry, item.source, max_area_km2),
        collections=["sentinel-2-l2a"],
        recipients=[],
        questions=[],
        properties=attributes,
    )
    try:
        _apply(area, opts.merged_over(AreaOptions.from_properties(item.properties)))
    except AreaError as exc:
        raise AreaError(f"{item.source}: {exc}") from None
    return area


def get_area(session: Session, ref: str | int | Area) -> Area:
    """Look an area up by name, or by id when REF is all digits or ``id:N`` (an Area is returned as it is).

    Raises AreaError when there is none, or when all digits name one area and number another (names taken
    from a GIS feature id, ``--name-property fid``, are numbers): the message names both and the way to say
    which."""
    if isinstance(ref, Area):
        return ref
    ref_s = str(ref).strip()
    bad = _unprintable(ref_s)
    if bad:
        raise AreaError(f"no area named or numbered {ref_s!r}: the name contains {bad}")
    if ref_s.lower().startswith("id:") and ref_s[3:].strip().isdigit():
        area = session.get(Area, int(ref_s[3:]))
        if area is None:
            raise AreaError(f"no area numbered {ref_s[3:].strip()} (see `unirs-monitor areas list`)")
        return area
    area = session.scalar(select(Area).where(Area.name == ref_s))
    if ref_s.isdigit():
        numbered = session.get(Area, int(ref_s))
        if area is not None and numbered is not None and numbered.id != area.id:
            raise AreaError(f"{ref_s!r} is the name of area {area.id} and the id of area {numbered.id} "
                            f"({numbered.name!r}): say id:{area.id} or id:{numbered.id}")
        area = area or numbered
    if area is None:
        raise AreaError(f"no area named or numbered {ref_s!r} (see `unirs-monitor areas list`)")
    return area


def list_areas(session: Session, status: str | None = None) -> list[Area]:
    """Areas (of ``status`` when given) by name regardless of case, names equal but for case by id."""
    query = select(Area)
    if status:
        query = query.where(Area.status == AreaStatus(status))
    # Sorted here, not by ORDER BY name: the database's collation may be C ("Zebra" before "apple").
    return sorted(session.scalars(query), key=lambda a: (a.name.casefold(), a.id))


def update_area(session: Session, ref: str | Area, opts: AreaOptions, *, max_area_km2: float,
                geometry: ParsedArea | None = None, rename: str | None = None,
                hints: Mapping[str, str | None] = CLI_HINTS) -> Area:
    area = get_area(session, ref)
    if rename is not None:
        new = validate_name(rename, hints)
        if new != area.name and session.scalar(select(Area.id).where(Area.name == new)) is not None:
            raise AreaError(f"an area named {new!r} already exists")
        area.name = new
    if geometry is not None:
        area.area_km2 = _check_size(geometry.geometry, geometry.source, max_area_km2)
        area.geom = from_shape(geometry.geometry, srid=4326)
    _apply(area, opts)
    session.flush()
    log.info("area %r updated", area.name)
    return area


def set_status(session: Session, ref: str | Area, status: AreaStatus) -> Area:
    area = get_area(session, ref)
    area.status = status
    log.info("area %r is now %s", area.name, status.value)
    return area


def remove_area(session: Session, ref: str | Area) -> str:
    area = get_area(session, ref)
    name = area.name
    session.delete(area)
    log.info("area %r removed with its observations, analyses and findings", name)
    return name


def area_geometry(area: Area) -> MultiPolygon:
    return to_shape(area.geom)


def area_properties(area: Area) -> dict[str, Any]:
    return {
        "id": area.id,
        "name": area.name,
        "status": area.status.value,
        "area_km2": round(area.area_km2, 4),
        "collections": list(area.collections),
        "max_cloud_cover": area.max_cloud_cover,
        "min_clear_fraction": area.min_clear_fraction,
        "min_covered_fraction": area.min_covered_fraction,
        "recipients": list(area.recipients),
        "questions": list(area.questions),
        "alert_frequency": area.alert_frequency.value,
        "min_alert_hectares": area.min_alert_hectares,
        "alert_classes": list(area.alert_classes),
        "alert_on": area.alert_on,
        "pairing_policy": area.pairing_policy.value,
        "attributes": dict(area.properties or {}),
    }


def area_feature(area: Area) -> dict[str, Any]:
    """The area as an RFC 7946 Feature: its id as the Feature ``id``, every other property kept."""
    props = {k: v for k, v in area_properties(area).items() if k != "id"}
    return to_feature(area_geometry(area), props, feature_id=area.id)


def export_feature_collection(areas: list[Area]) -> dict[str, Any]:
    """RFC 7946 FeatureCollection (no ``crs`` member: WGS84 lon/lat); `areas add` reads it back."""
    return {"type": "FeatureCollection", "features": [area_feature(a) for a in areas]}
