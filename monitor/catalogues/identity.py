"""Which acquisition a STAC item belongs to, and which granule of it — independent of the catalogue, the
collection, the tile and the reprocessing that served it.

- **Acquisition** (Sentinel-2): platform + datatake sensing start. The datatake is one continuous imaging
  strip; every MGRS tile it crosses is a granule of it. The start is read from ``s2:datatake_id``
  (``GS2B_20250731T130249_043879_N05.11``), else from the product id (``…_MSIL2A_20250731T130249_…``, in
  ``s2:product_uri``, ``sentinel:product_id``, ``sentinel2:product_title`` or a Planetary Computer id),
  else the item's ``datetime`` to the second (Planetary Computer's ``datetime`` *is* the datatake start;
  Earth Search's is the tile's sensing time, tens of seconds later — which is why it comes last).
- **Acquisition** (Landsat): platform + WRS-2 path/row + date (one scene is one granule).
- **Granule key**: acquisition key + tile. Earth Search v1 ``S2B_24MVV_20250731_0_L2A`` and its
  Collection-1 twin ``S2B_T24MVV_20250731T130245_L2A`` are two *versions* of one granule; Planetary
  Computer's item of the same tile is a third. The version rank decides which one is kept (each version
  carries its own radiometry rule, so conventions never mix within a granule).

Sources: ESA *Sentinel-2 Products Specification Document* (product naming, datatake identifier); USGS
Landsat Collection 2 product identifier; real items in tests/data/items/.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

# GS2B_20250731T130249_043879_N05.11 (s2:datatake_id)
_DATATAKE_ID_RE = re.compile(r"^GS2[A-D]_(\d{8}T\d{6})_")
# S2B_MSIL2A_20250731T130249_N0511_R095_T24MVV_20250731T132745(.SAFE)
_PRODUCT_RE = re.compile(r"^S2[A-D]_MSI(?:L2A|L1C)_(\d{8}T\d{6})_")
_PRODUCT_TILE_RE = re.compile(r"_T(\d{2}[C-X][A-Z]{2})_")
_PRODUCT_BASELINE_RE = re.compile(r"_N(\d{2})(\d{2})_")
PRODUCT_ID_KEYS = ("s2:product_uri", "sentinel:product_id", "sentinel2:product_title")


def product_id(props: dict[str, Any], item_id: str) -> str | None:
    """The ESA product name of a Sentinel-2 item, from its properties or (Planetary Computer) its id."""
    for key in PRODUCT_ID_KEYS:
        value = props.get(key)
        if isinstance(value, str) and _PRODUCT_RE.match(value):
            return value
    return item_id if _PRODUCT_RE.match(item_id) else None


def datatake_start(props: dict[str, Any], item_id: str, acquired_at: datetime) -> tuple[datetime, str]:
    """(sensing start of the item's datatake, where it was read from). Falls back to ``acquired_at`` to the
    second when the item names no datatake (then tiles of one strip stay separate acquisitions)."""
    value = props.get("s2:datatake_id")
    if isinstance(value, str):
        match = _DATATAKE_ID_RE.match(value)
        if match:
            return _stamp(match.group(1)), "s2:datatake_id"
    product = product_id(props, item_id)
    if product is not None:
        return _stamp(_PRODUCT_RE.match(product).group(1)), "product id"
    return acquired_at.replace(microsecond=0), "datetime"


def _stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)


def product_tile(props: dict[str, Any], item_id: str) -> str | None:
    """MGRS tile from the product id (``_T34TER_``), for items that name it nowhere else."""
    product = product_id(props, item_id)
    match = _PRODUCT_TILE_RE.search(product) if product else None
    return match.group(1) if match else None


def product_baseline(props: dict[str, Any], item_id: str) -> str | None:
    """Processing baseline from the product id (``_N0510_`` → ``"05.10"``), for items without the property."""
    product = product_id(props, item_id)
    match = _PRODUCT_BASELINE_RE.search(product) if product else None
    if not match or match.group(0) == "_N0000_":
        return None
    return f"{match.group(1)}.{match.group(2)}"


def constellation(platform: str | None) -> str:
    """``"sentinel-2b"`` → ``"sentinel-2"``, ``"landsat-9"`` → ``"landsat"``: scenes comparable with each other."""
    if not platform:
        return "unknown"
    if platform.startswith("landsat"):
        return "landsat"
    return platform[:-1] if platform[-1:] in "abcd" and platform.startswith("sentinel-") else platform


def acquisition_key(platform: str | None, tile: str | None, datatake: datetime, acquired_at: datetime) -> str:
    """``sentinel-2b|2025-07-31T13:02:49Z`` or, for Landsat, ``landsat-8|033032|2023-10-08``."""
    name = platform or "unknown"
    if constellation(platform) == "landsat":
        return f"{name}|{tile or ''}|{acquired_at:%Y-%m-%d}"
    return f"{name}|{datatake:%Y-%m-%dT%H:%M:%SZ}"


def granule_key(acquisition: str, tile: str | None, item_id: str) -> str:
    """``<acquisition key>|<tile>`` (the item id when the item names no tile: then nothing merges with it)."""
    return f"{acquisition}|{tile or 'id:' + item_id}"
