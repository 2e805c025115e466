"""Reflectance harmonisation: digital numbers of an asset → surface reflectance (0–1), per collection.

Sentinel-2 L2A (ESA, *Sentinel-2 Products Specification Document*, and the processing-baseline 04.00
note of 2022-01-25): from baseline 04.00 the ESA products carry a +1000 DN offset, so
reflectance = (DN − 1000) / 10000; before 04.00, DN / 10000. What a *catalogue's COG* holds depends on
the collection (:mod:`eo.profiles`): Earth Search v1/v0 remove the offset and say so with a flag
(``earthsearch:boa_offset_applied`` / ``sentinel:boa_offset_applied``), Earth Search C1 and Planetary
Computer keep it. Landsat Collection 2 L2 and unknown collections use ``raster:bands`` scale/offset.

:func:`decide` makes the decision from the item's flag, the baseline and ``raster:bands`` together, and
says which rule it used (recorded with every analysis). The flag is known to be wrong on some
reprocessed items (Element84/earth-search #66, #71), so the workers also check the pixels
(:func:`check_pixels`): a rule that subtracts 1000 DN from pixels that are mostly below 1000 DN is
contradicted by the data, and the analysis fails with that sentence (:class:`RadiometryMismatch`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from eo.profiles import GENERIC, CollectionProfile

logger = logging.getLogger(__name__)

# Sentinel-2 baseline from which ESA DNs carry the +1000 offset (introduced 2022-01-25).
S2_OFFSET_BASELINE = 4.0
S2_OFFSET_DN = 1000.0
S2_SCALE = 10000.0
# With the offset still in the pixels a clear land pixel below 1000 DN would be a negative reflectance
# (ESA clips BOA at −0.1, so a few very dark pixels can be): more than this share of the clear
# pixels below 1000 DN contradicts a rule that subtracts the offset.
NEGATIVE_SHARE_LIMIT = 0.05
# Bands that are not surface reflectance (no scaling applies).
NON_REFLECTANCE = frozenset({"scl", "qa_pixel", "visual", "thumbnail"})


class RadiometryMismatch(ValueError):
    """The item's metadata and its pixels disagree on the scaling; the message is the reason recorded."""


@dataclass(frozen=True)
class ReflectanceRule:
    """reflectance = DN × scale + offset.

    ``description`` is what the analysis records (it starts with the formula, e.g. ``"(DN - 1000) /
    10000"``); ``rule`` names the decision (``"esa-baseline"``, ``"flag-offset-removed"``,
    ``"raster-bands"``, …); ``offset_in_pixels`` is True/False when the Sentinel-2 +1000 DN offset is
    believed to be in the pixels or not, None when that question does not apply (Landsat, unknown).
    """

    scale: float
    offset: float
    description: str
    rule: str = "legacy"
    profile: str = GENERIC.name
    offset_in_pixels: bool | None = None

    def as_asset_fields(self) -> dict[str, Any]:
        """The fields stored in a scene's asset entry (JSONB)."""
        fields = asdict(self)
        return {"scale": fields.pop("scale"), "offset": fields.pop("offset"),
                "radiometry": fields}

    @classmethod
    def from_asset(cls, entry: Mapping[str, Any]) -> ReflectanceRule | None:
        """The rule stored by :meth:`as_asset_fields`, or None for an entry written before profiles."""
        stored = entry.get("radiometry")
        if not isinstance(stored, Mapping):
            return None
        return cls(scale=float(entry.get("scale", 1.0)), offset=float(entry.get("offset", 0.0)),
                   description=str(stored.get("description", "")), rule=str(stored.get("rule", "")),
                   profile=str(stored.get("profile", "")), offset_in_pixels=stored.get("offset_in_pixels"))


def baseline_number(baseline: str | None) -> float | None:
    """``"05.10"`` → 5.1; None for a missing or unparsable baseline."""
    if not baseline:
        return None
    try:
        return float(baseline)
    except ValueError:
        return None


def _raster_band(asset: Mapping[str, Any]) -> tuple[float | None, float | None]:
    bands = asset.get("raster:bands")
    first = bands[0] if isinstance(bands, list) and bands and isinstance(bands[0], Mapping) else {}
    scale, offset = first.get("scale"), first.get("offset")

    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    return number(scale), number(offset)


def _flag(props: Mapping[str, Any], profile: CollectionProfile) -> tuple[str | None, bool | None]:
    names = [profile.offset_flag] if profile.offset_flag else []
    if profile is GENERIC:
        names = ["earthsearch:boa_offset_applied", "sentinel:boa_offset_applied"]
    for name in names:
        value = props.get(name)
        if isinstance(value, bool):
            return name, value
    return (names[0] if names else None), None


def decide(profile: CollectionProfile, props: Mapping[str, Any], asset: Mapping[str, Any],
           baseline: str | None) -> ReflectanceRule:
    """The scaling of one reflectance asset of one item (``props`` = the item's properties).

    Sentinel-2 items (a processing baseline, or a profile whose convention is ``esa``/``flag``): the ESA
    rule by baseline, unless the profile's flag says the offset was already removed. Everything else:
    ``raster:bands`` scale/offset, else the profile's declared ones, else DN as is (said so).
    """
    number = baseline_number(baseline)
    raster_scale, raster_offset = _raster_band(asset)
    s2 = profile.convention in ("esa", "flag") or (profile is GENERIC and number is not None)
    if s2 and number is not None:
        listed = f"; raster:bands offset {raster_offset:g} ignored" if raster_offset not in (None, 0.0) else ""
        if number < S2_OFFSET_BASELINE:
            return ReflectanceRule(1 / S2_SCALE, 0.0, f"DN / 10000 (baseline {baseline}: no offset; "
                                   f"{profile.name}){listed if raster_offset else ''}", "esa-baseline",
                                   profile.name, False)
        flag_name, flag = _flag(props, profile)
        if profile.convention == "flag" or profile is GENERIC:
            if flag:
                return ReflectanceRule(1 / S2_SCALE, 0.0, f"DN / 10000 (baseline {baseline}, {flag_name}=true: "
                                       f"offset already removed by the catalogue; {profile.name}){listed}",
                                       "flag-offset-removed", profile.name, False)
        said = f", {flag_name}={'false' if flag is False else 'absent'}" if flag_name else ""
        return ReflectanceRule(1 / S2_SCALE, -S2_OFFSET_DN / S2_SCALE,
                               f"(DN - 1000) / 10000 (baseline {baseline}{said}: ESA offset in the pixels; "
                               f"{profile.name})", "esa-baseline", profile.name, True)
    if s2:
        # A Sentinel-2 collection without a baseline: raster:bands if it says anything, else pre-04.00 DNs.
        if raster_scale is not None:
            return ReflectanceRule(raster_scale, raster_offset or 0.0,
                                   f"DN * {raster_scale:g} + {raster_offset or 0.0:g} (raster:bands, no baseline; "
                                   f"{profile.name})", "raster-bands", profile.name, None)
        return ReflectanceRule(1 / S2_SCALE, 0.0, f"DN / 10000 (no baseline, no raster:bands; {profile.name})",
                               "s2-default", profile.name, None)
    if raster_scale is not None or raster_offset is not None:
        scale, offset = raster_scale if raster_scale is not None else 1.0, raster_offset or 0.0
        return ReflectanceRule(scale, offset, f"DN * {scale:g} + {offset:g} (asset scale/offset, raster:bands; "
                               f"{profile.name})", "raster-bands", profile.name, None)
    if profile.scale is not None:
        offset = profile.offset or 0.0
        return ReflectanceRule(profile.scale, offset, f"DN * {profile.scale:g} + {offset:g} (declared for "
                               f"{profile.name})", "profile", profile.name, None)
    return ReflectanceRule(1.0, 0.0, f"DN * 1 + 0 (asset scale/offset: none given; {profile.name})",
                           "unscaled", profile.name, None)


def reflectance_rule(processing_baseline: str | None, asset: Mapping[str, Any]) -> ReflectanceRule:
    """The rule of one stored asset entry: the one decided at ingest when recorded, else (scenes stored
    before collection profiles) by Sentinel-2 processing baseline, else the entry's ``scale``/``offset``."""
    stored = ReflectanceRule.from_asset(asset)
    if stored is not None:
        return stored
    baseline = baseline_number(processing_baseline)
    if baseline is not None:
        if baseline >= S2_OFFSET_BASELINE:
            return ReflectanceRule(1.0 / S2_SCALE, -S2_OFFSET_DN / S2_SCALE,
                                   f"(DN - 1000) / 10000 (baseline {processing_baseline})", offset_in_pixels=True)
        return ReflectanceRule(1.0 / S2_SCALE, 0.0, f"DN / 10000 (baseline {processing_baseline})",
                               offset_in_pixels=False)
    scale, offset = float(asset.get("scale", 1.0)), float(asset.get("offset", 0.0))
    return ReflectanceRule(scale, offset, f"DN * {scale:g} + {offset:g} (asset scale/offset)")


def to_reflectance(dn: np.ma.MaskedArray, rule: ReflectanceRule) -> np.ndarray:
    """float32 reflectance of ``dn`` (any shape); masked (no-data) pixels become NaN."""
    # In place on the one float32 copy (the same operations in the same order: the same values).
    out = dn.data.astype(np.float32)
    out *= np.float32(rule.scale)
    out += np.float32(rule.offset)
    if np.ma.is_masked(dn):
        np.copyto(out, np.float32(np.nan), where=np.ma.getmaskarray(dn))
    return out


def check_pixels(item_id: str, rule: ReflectanceRule, red_dn: np.ma.MaskedArray,
                 where: np.ndarray) -> str | None:
    """Check the rule of a red band against its clear pixels (``where``, bool, same shape).

    Raises :class:`RadiometryMismatch` when the rule subtracts the +1000 DN offset but more than
    :data:`NEGATIVE_SHARE_LIMIT` of the clear pixels are below 1000 DN (impossible with the offset in).
    Returns a note (or None) when the rule says the offset is gone yet even the darkest clear pixel is at
    or above 1000 DN: suspicious, but a bright surface can do that, so it is only recorded.
    """
    values = red_dn.data[where & ~np.ma.getmaskarray(red_dn)]
    return check_pixel_counts(item_id, rule, *red_counts(values))


def red_counts(values: np.ndarray) -> tuple[int, int, int | None]:
    """(pixels below 1000 DN, pixels, darkest DN or None) of clear red DNs: what :func:`check_pixel_counts`
    needs, summable block by block (the darkest by ``min``)."""
    if values.size == 0:
        return 0, 0, None
    return int((values < S2_OFFSET_DN).sum()), int(values.size), int(values.min())


def check_pixel_counts(item_id: str, rule: ReflectanceRule, below: int, total: int,
                       darkest: int | None) -> str | None:
    """:func:`check_pixels` from counts (:func:`red_counts`), so a large area can be checked block by block."""
    if total == 0 or rule.offset_in_pixels is None:
        return None
    if rule.offset_in_pixels:
        share = below / total
        if share <= NEGATIVE_SHARE_LIMIT:
            return None
        logger.warning("%s: %.0f%% of clear red pixels below 1000 DN under rule %s", item_id, 100 * share, rule.rule)
        raise RadiometryMismatch(
            f"radiometry of {item_id} contradicts its metadata: {share:.0%} of the clear red pixels are below "
            f"1000 DN, impossible if the +1000 DN offset were in the pixels as the metadata say "
            f"({rule.description}); the catalogue has probably removed it already without flagging it")
    if darkest is not None and darkest >= S2_OFFSET_DN and rule.rule == "flag-offset-removed":
        return (f"{item_id}: even the darkest clear red pixel is {darkest} DN although the offset is flagged as "
                "removed; if this area has no dark surface the flag may be wrong")
    return None
