"""Collection profiles: what each known STAC collection calls its bands and how its pixels are scaled.

One catalogue entry (``[[catalogues]]``) can serve several collections whose assets are named and
scaled differently (Planetary Computer ``sentinel-2-l2a`` has ``B04``/``SCL`` with the ESA +1000 DN
offset kept; its ``landsat-c2-l2`` has ``red``/``qa_pixel`` at 2.75e-5 − 0.2). So the rules are declared
per *collection*, and the profile of an item is found from the catalogue's explicit choice
(``CatalogueSettings.profiles``) or, failing that, from the item itself (:func:`detect_profile`).

Sources of the declared facts (design notes §4.2–4.4, checked on real items in tests/data/items/):

- Earth Search v1 ``sentinel-2-l2a``: COGs of the ESA product with the +1000 DN offset *removed* for
  baseline ≥ 04.00 items, which say so with ``earthsearch:boa_offset_applied: true`` (``raster:bands``
  still lists offset −0.1: ignored). Element84 earth-search README and issues #9, #66, #71.
- Earth Search ``sentinel-2-c1-l2a`` and Planetary Computer ``sentinel-2-l2a``: the ESA DNs as
  delivered: +1000 DN from baseline 04.00 (ESA, *Sentinel-2 L2A PSD*, baseline 04.00 note of 2022-01-25).
- Earth Search v0 ``sentinel-s2-l2a-cogs``: like v1 but the flag is ``sentinel:boa_offset_applied``.
- Landsat Collection 2 Level-2 (Earth Search and Planetary Computer ``landsat-c2-l2``): reflectance =
  DN × 2.75e-5 − 0.2 (USGS *Landsat 8-9 C2 L2 Science Product Guide*), also in ``raster:bands``.

Adding a collection: declare a :class:`CollectionProfile` in :data:`PROFILES` (README, "Catalogues").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# How a profile's reflectance DNs relate to the ESA product:
# - "esa": as ESA delivers them, +1000 DN from baseline 04.00 (the pixels were not touched);
# - "flag": like "esa" unless the item's ``offset_flag`` property is true (offset already removed);
# - "raster-bands": the asset's ``raster:bands`` scale/offset, else the profile's declared ones.
Convention = Literal["esa", "flag", "raster-bands"]

S2_ES_KEYS = {"blue": "blue", "green": "green", "red": "red", "nir": "nir", "swir16": "swir16", "scl": "scl",
              "visual": "visual"}
S2_ESA_KEYS = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "swir16": "B11", "scl": "SCL",
               "visual": "visual"}
S2_V0_KEYS = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "swir16": "B11", "scl": "SCL",
              "visual": "visual"}
LANDSAT_KEYS = {"blue": "blue", "green": "green", "red": "red", "nir": "nir08", "swir16": "swir16",
                "qa_pixel": "qa_pixel"}

# Common names (STAC eo:bands) of the logical bands, for collections nobody declared.
COMMON_NAMES = {"blue": ("blue",), "green": ("green",), "red": ("red",), "nir": ("nir", "nir08"),
                "swir16": ("swir16",)}
MASK_KEYS = {"scl": ("scl",), "qa_pixel": ("qa_pixel", "qa")}


@dataclass(frozen=True)
class CollectionProfile:
    """Asset names and pixel scaling of one collection of one catalogue family."""

    name: str  # "<catalogue family>/<collection>", recorded with every analysis
    collections: tuple[str, ...]
    asset_keys: Mapping[str, str]
    convention: Convention
    offset_flag: str | None = None  # item property saying the +1000 DN offset was removed
    # Declared scaling when an asset has no raster:bands (Landsat C2 L2).
    scale: float | None = None
    offset: float | None = None
    # Properties whose presence marks an item of this family (told apart from a same-named collection).
    marker_prefixes: tuple[str, ...] = ()
    marker_assets: tuple[str, ...] = ()
    # Tie-breaker between versions of one granule with equal baseline and generation time (Earth Search
    # v1 and C1 serve the same ESA product): C1 keeps ESA's DNs untouched, so no flag can be wrong.
    preference: int = 1
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


PROFILES: tuple[CollectionProfile, ...] = (
    CollectionProfile(
        "earth-search-v1/sentinel-2-l2a", ("sentinel-2-l2a",), S2_ES_KEYS, "flag",
        offset_flag="earthsearch:boa_offset_applied", marker_prefixes=("earthsearch:",), marker_assets=("red",),
        notes="offset removed for baseline >= 04.00 when earthsearch:boa_offset_applied is true"),
    CollectionProfile(
        "earth-search/sentinel-2-c1-l2a", ("sentinel-2-c1-l2a",), S2_ES_KEYS, "esa", preference=2,
        notes="Collection-1 reprocessing: ESA DNs, +1000 from baseline 04.00"),
    CollectionProfile(
        "earth-search-v0/sentinel-s2-l2a-cogs", ("sentinel-s2-l2a-cogs",), S2_V0_KEYS, "flag",
        offset_flag="sentinel:boa_offset_applied", marker_prefixes=("sentinel:",), preference=0,
        notes="legacy v0 property names (sentinel:*)"),
    CollectionProfile(
        "planetary-computer/sentinel-2-l2a", ("sentinel-2-l2a",), S2_ESA_KEYS, "esa",
        marker_assets=("B04",), notes="ESA DNs, +1000 from baseline 04.00; hrefs need SAS signing"),
    CollectionProfile(
        "earth-search/landsat-c2-l2", ("landsat-c2-l2",), LANDSAT_KEYS, "raster-bands", scale=2.75e-5,
        offset=-0.2, marker_prefixes=("earthsearch:",), notes="s3:// requester-pays hrefs"),
    CollectionProfile(
        "planetary-computer/landsat-c2-l2", ("landsat-c2-l2",), LANDSAT_KEYS, "raster-bands", scale=2.75e-5,
        offset=-0.2, notes="hrefs need SAS signing"),
)
BY_NAME = {p.name: p for p in PROFILES}

# Unknown STAC APIs: bands by eo:bands common name, scaling from raster:bands (Sentinel-2 items with a
# processing baseline follow the ESA rule, honouring either known offset flag).
GENERIC = CollectionProfile("generic", (), {}, "raster-bands", preference=0)


def profile_by_name(name: str) -> CollectionProfile:
    """The declared profile called ``name``; ``KeyError`` naming the known ones otherwise."""
    if name == GENERIC.name:
        return GENERIC
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no collection profile {name!r} (known: {', '.join(sorted(BY_NAME))}, generic)") from None


def detect_profile(item: Mapping[str, Any], collection: str | None,
                   configured: Mapping[str, str] | None = None) -> CollectionProfile:
    """The profile of one raw item: the catalogue's choice for its collection, else the declared profile
    of that collection id whose markers the item carries, else the only one of that id, else generic."""
    if configured and collection in configured:
        return profile_by_name(configured[collection])
    props = item.get("properties") if isinstance(item.get("properties"), dict) else {}
    assets = item.get("assets") if isinstance(item.get("assets"), dict) else {}
    candidates = [p for p in PROFILES if collection in p.collections]
    for profile in candidates:
        prefixed = any(str(k).startswith(profile.marker_prefixes) for k in props) if profile.marker_prefixes else False
        if prefixed or (profile.marker_assets and any(a in assets for a in profile.marker_assets)):
            return profile
    unmarked = [p for p in candidates if not p.marker_prefixes and not p.marker_assets]
    if len(unmarked) == 1:
        return unmarked[0]
    if len(candidates) == 1:
        return candidates[0]
    return GENERIC


def generic_asset_keys(assets: Mapping[str, Any]) -> dict[str, str]:
    """Logical band → asset key from the assets' ``eo:bands`` common names (and mask asset names)."""
    out: dict[str, str] = {}
    for key, asset in assets.items():
        if not isinstance(asset, dict):
            continue
        lowered = str(key).lower()
        for band, names in MASK_KEYS.items():
            if lowered in names and band not in out:
                out[band] = key
        bands = asset.get("eo:bands")
        if isinstance(bands, list) and len(bands) == 1 and isinstance(bands[0], dict):
            common = bands[0].get("common_name")
            for band, names in COMMON_NAMES.items():
                if common in names and band not in out:
                    out[band] = key
        elif lowered in COMMON_NAMES and lowered not in out:
            out[lowered] = key
    if "visual" in assets:
        out.setdefault("visual", "visual")
    return out
