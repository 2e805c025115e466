"""Reflectance harmonisation: digital numbers of an asset → surface reflectance (0–1).

Sentinel-2 L2A (ESA, *Sentinel-2 Products Specification Document*, and the processing-baseline 04.00
note of 2022-01-25): from baseline 04.00 the products carry a +1000 DN offset, so
reflectance = (DN − 1000) / 10000; before 04.00, DN / 10000. Other collections (Landsat Collection 2)
use the asset's ``scale``/``offset`` (STAC ``raster:bands``). No-data becomes NaN.

The pixels can still contradict the metadata (design notes: "check against the pixels when in doubt"):
:func:`offset_contradiction` says so in words the analysis records.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Sentinel-2 baseline from which DNs carry the +1000 offset (introduced 2022-01-25).
S2_OFFSET_BASELINE = 4.0
S2_OFFSET_DN = 1000.0
S2_SCALE = 10000.0
# More than this share of clear red pixels below zero after the offset: the offset was probably already
# removed upstream.
NEGATIVE_SHARE_LIMIT = 0.05


@dataclass(frozen=True)
class ReflectanceRule:
    """reflectance = DN × scale + offset; ``description`` is what the analysis records."""

    scale: float
    offset: float
    description: str


def baseline_number(baseline: str | None) -> float | None:
    """``"05.10"`` → 5.1; None for a missing or unparsable baseline."""
    if not baseline:
        return None
    try:
        return float(baseline)
    except ValueError:
        return None


def reflectance_rule(processing_baseline: str | None, asset: Mapping[str, Any]) -> ReflectanceRule:
    """The rule for one band of one scene: by Sentinel-2 processing baseline when the scene has one, else
    the asset's ``scale``/``offset``."""
    baseline = baseline_number(processing_baseline)
    if baseline is not None:
        if baseline >= S2_OFFSET_BASELINE:
            return ReflectanceRule(1.0 / S2_SCALE, -S2_OFFSET_DN / S2_SCALE,
                                   f"(DN - 1000) / 10000 (baseline {processing_baseline})")
        return ReflectanceRule(1.0 / S2_SCALE, 0.0, f"DN / 10000 (baseline {processing_baseline})")
    scale, offset = float(asset.get("scale", 1.0)), float(asset.get("offset", 0.0))
    return ReflectanceRule(scale, offset, f"DN * {scale:g} + {offset:g} (asset scale/offset)")


def to_reflectance(dn: np.ma.MaskedArray, rule: ReflectanceRule) -> np.ndarray:
    """float32 reflectance of ``dn`` (any shape); masked (no-data) pixels become NaN."""
    out = dn.data.astype(np.float32) * np.float32(rule.scale) + np.float32(rule.offset)
    out[np.ma.getmaskarray(dn)] = np.nan
    return out


def offset_contradiction(item_id: str, processing_baseline: str | None, red: np.ndarray,
                         where: np.ndarray) -> str | None:
    """A sentence when the clear red reflectances say the +1000 DN offset was already removed upstream
    (clear land almost never has negative red reflectance), else None."""
    baseline = baseline_number(processing_baseline)
    values = red[where & np.isfinite(red)]
    if baseline is None or baseline < S2_OFFSET_BASELINE or values.size == 0:
        return None
    share = float((values < 0).mean())
    if share <= NEGATIVE_SHARE_LIMIT:
        return None
    logger.warning("%s: %.0f%% of clear red pixels are negative after removing the baseline %s offset",
                   item_id, 100 * share, processing_baseline)
    return (f"{item_id}: {share:.0%} of clear red reflectances are negative after subtracting the "
            f"baseline {processing_baseline} offset; the offset may already have been applied upstream")
