"""From a raw STAC item (a dict from the catalogue) to what a scene row needs — or a readable refusal.

Pure functions, no I/O: the rules for the canonical acquisition key, the version rank, the tile, the
relative orbit and the asset mapping live here so they can be tested against real item shapes.

- acquisition key = platform + datatake start (Landsat: path/row + date), granule key = acquisition +
  tile (:mod:`monitor.catalogues.identity`): Earth Search's ``_0_``/``_1_`` twins, reprocessed versions,
  the C1 twin and another catalogue's item of the same tile share the granule key; the tiles of one
  datatake share the acquisition key.
- version rank = ``[processing baseline, generation/updated time, sequence, profile preference]`` as
  numbers, so PostgreSQL can compare two ranks as JSONB arrays (same length, element by element).
- legacy Earth Search v0 names (``sentinel:utm_zone``/``latitude_band``/``grid_square``,
  ``sentinel:product_id``, ``sentinel:processing_baseline``, ``sentinel:sequence``) are read too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin

import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from core.config import CatalogueSettings
from eo import radiometry
from eo.profiles import GENERIC, CollectionProfile, detect_profile, generic_asset_keys
from eo.security import HrefRefused, check_href
from monitor.catalogues import identity
from monitor.geometry import antimeridian_safe

# A scene needs these to be analysed: a cloud mask, and red + near-infrared for the spectral indices.
MASK_BANDS = ("scl", "qa_pixel")
REQUIRED_BANDS = ("red", "nir")
NON_REFLECTANCE = radiometry.NON_REFLECTANCE

_ORBIT_RE = re.compile(r"_R(\d{3})_")
_SEQUENCE_RE = re.compile(r"_(\d+)_L[12][ABC]?$")
_FRACTION_RE = re.compile(r"(\.\d{6})\d+")
_PLATFORM_PREFIX = {"S2A": "sentinel-2a", "S2B": "sentinel-2b", "S2C": "sentinel-2c", "S2D": "sentinel-2d",
                    "LC08": "landsat-8", "LC09": "landsat-9", "LE07": "landsat-7", "LT05": "landsat-5"}


class MalformedItem(ValueError):
    """The item cannot become a scene; the message names the field and what is wrong with it."""


@dataclass
class ParsedItem:
    item_id: str
    collection: str | None
    acquisition_key: str  # platform|datatake start (Landsat: platform|path-row|date)
    granule_key: str  # acquisition key|tile
    datatake_at: datetime
    version_rank: list[float]
    platform: str | None
    tile: str | None
    relative_orbit: int | None
    acquired_at: datetime
    cloud_cover: float | None
    processing_baseline: str | None
    footprint: BaseGeometry
    assets: dict[str, dict[str, Any]]
    profile: str = GENERIC.name
    warnings: list[str] = field(default_factory=list)


def parse_item(item: Any, catalogue: CatalogueSettings) -> ParsedItem:
    """Validate and normalise one item; raise :class:`MalformedItem` naming the offending field."""
    if not isinstance(item, dict):
        raise MalformedItem(f"item must be a JSON object, got {type(item).__name__}")
    item_id = item.get("id")
    if not isinstance(item_id, str) or not item_id:
        raise MalformedItem(f"id must be a non-empty string, got {_show(item_id)}")
    _check_identifier(item_id, "id")
    props = item.get("properties")
    if not isinstance(props, dict):
        raise MalformedItem(f"properties must be an object, got {_show(props)}")
    collection = item.get("collection")
    if collection is not None and not isinstance(collection, str):
        raise MalformedItem(f"collection must be a string, got {_show(collection)}")
    if collection is not None:
        _check_identifier(collection, "collection")

    acquired_at = _sensing_time(props)
    footprint = _footprint(item.get("geometry"))
    cloud_cover = _optional_number(props, "eo:cloud_cover")
    if cloud_cover is not None and not 0 <= cloud_cover <= 100:
        raise MalformedItem(f"properties.eo:cloud_cover must be within 0..100, got {cloud_cover}")
    baseline = _baseline(props) or identity.product_baseline(props, item_id)
    platform = _platform(props, item_id)
    tile = _tile(props) or identity.product_tile(props, item_id)
    orbit = _relative_orbit(props, item_id)
    try:
        profile = detect_profile(item, collection, catalogue.profiles)
    except KeyError as exc:  # a misspelt profile in the catalogue settings
        raise MalformedItem(f"catalogue {catalogue.name!r}: {exc.args[0]}") from None
    rank = [
        float(baseline) if baseline else 0.0,
        _generation_epoch(props, item_id),
        float(_sequence(props, item_id)),
        float(profile.preference),
    ]
    assets = normalise_assets(item, catalogue, baseline, profile=profile, collection=collection)
    datatake, _ = identity.datatake_start(props, item_id, acquired_at)
    key = identity.acquisition_key(platform, tile, datatake, acquired_at)
    return ParsedItem(
        item_id=item_id,
        collection=collection,
        acquisition_key=key,
        granule_key=identity.granule_key(key, tile, item_id),
        datatake_at=datatake,
        version_rank=rank,
        platform=platform,
        tile=tile,
        relative_orbit=orbit,
        acquired_at=acquired_at,
        cloud_cover=cloud_cover,
        processing_baseline=baseline,
        footprint=footprint,
        assets=assets,
        profile=profile.name,
    )


# --- fields ----------------------------------------------------------------------------------------


# Ids flow into file names, log lines, email and the web app: printable Unicode without markup or quotes.
_MARKUP = set("<>&\"'`\\")
MAX_ID_LENGTH = 256


def _check_identifier(value: str, name: str) -> None:
    if len(value) > MAX_ID_LENGTH:
        raise MalformedItem(f"{name} is {len(value)} characters long (max {MAX_ID_LENGTH})")
    for index, ch in enumerate(value):
        if not ch.isprintable():
            raise MalformedItem(f"{name} contains a control or non-printable character "
                                f"U+{ord(ch):04X} at {index}: {_show(value)}")
        if ch in _MARKUP:
            raise MalformedItem(f"{name} contains the markup character {ch!r} at {index}: {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"


def parse_datetime(value: Any, name: str) -> datetime:
    if not isinstance(value, str) or not value:
        raise MalformedItem(f"{name} must be an RFC 3339 string, got {_show(value)}")
    text = _FRACTION_RE.sub(r"\1", value.strip())  # Python parses at most microseconds
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise MalformedItem(f"{name} is not an RFC 3339 date-time: {value[:60]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)  # STAC says UTC; naive values are treated as such
    return parsed.astimezone(UTC)


def _sensing_time(props: dict[str, Any]) -> datetime:
    value = props.get("datetime")
    if value is None:
        # STAC allows a null datetime with a range; a range is not an acquisition instant we can key on.
        if props.get("start_datetime") is not None:
            raise MalformedItem("properties.datetime is null (only start/end_datetime): not one acquisition")
        raise MalformedItem("properties.datetime is missing or null")
    return parse_datetime(value, "properties.datetime")


def _footprint(geometry: Any) -> BaseGeometry:
    if geometry is None:
        raise MalformedItem("geometry is null: the item cannot be matched to any area")
    if not isinstance(geometry, dict):
        raise MalformedItem(f"geometry must be a GeoJSON object, got {_show(geometry)}")
    if geometry.get("type") not in ("Polygon", "MultiPolygon"):
        raise MalformedItem(f"geometry.type must be Polygon or MultiPolygon, got {_show(geometry.get('type'))}")
    try:
        geom = shape(geometry)
    except Exception as exc:  # shapely raises several types for broken coordinate arrays
        raise MalformedItem(f"geometry.coordinates are not a valid {geometry.get('type')}: {exc}") from None
    if geom.is_empty:
        raise MalformedItem("geometry is empty")
    coords = shapely.get_coordinates(geom)
    lon_ok = ((coords[:, 0] >= -180) & (coords[:, 0] <= 180)).all()
    lat_ok = ((coords[:, 1] >= -90) & (coords[:, 1] <= 90)).all()
    if not (lon_ok and lat_ok):
        raise MalformedItem("geometry.coordinates are outside longitude -180..180 / latitude -90..90")
    try:
        geom = antimeridian_safe(geom)
    except (ValueError, shapely.errors.ShapelyError) as exc:
        raise MalformedItem(f"geometry crosses the antimeridian and cannot be split there: {exc}") from None
    if not geom.is_valid:
        # Self-intersecting footprints exist in the wild; repair rather than lose the scene.
        geom = shapely.make_valid(geom)
    return geom


def _optional_number(props: dict[str, Any], key: str) -> float | None:
    value = props.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MalformedItem(f"properties.{key} must be a number, got {_show(value)}")
    return float(value)


BASELINE_KEYS = ("s2:processing_baseline", "sentinel:processing_baseline", "sentinel2:processing_baseline")


def _baseline(props: dict[str, Any]) -> str | None:
    name = next((k for k in BASELINE_KEYS if props.get(k) is not None), None)
    if name is None:
        return None
    value = props[name]
    if isinstance(value, bool):
        raise MalformedItem(f"properties.{name} must be like '05.11', got {_show(value)}")
    if isinstance(value, int | float):
        # A number is unambiguous enough to coerce (5.1 -> "05.10"); it is still the same baseline.
        if not math.isfinite(value) or not 0 <= value < 100:
            raise MalformedItem(f"properties.{name} out of range: {value}")
        return f"{value:05.2f}"
    if isinstance(value, str) and re.fullmatch(r"\d{1,2}\.\d{1,2}", value.strip()):
        major, minor = value.strip().split(".")
        return f"{int(major):02d}.{int(minor):02d}"
    raise MalformedItem(f"properties.{name} must be like '05.11', got {_show(value)}")


def _platform(props: dict[str, Any], item_id: str) -> str | None:
    value = props.get("platform")
    if value is not None:
        if not isinstance(value, str):
            raise MalformedItem(f"properties.platform must be a string, got {_show(value)}")
        return value.strip().lower() or None
    return _PLATFORM_PREFIX.get(item_id.split("_", 1)[0].upper())


def _tile(props: dict[str, Any]) -> str | None:
    value = props.get("s2:mgrs_tile")
    if value is not None:
        if not isinstance(value, str):
            raise MalformedItem(f"properties.s2:mgrs_tile must be a string, got {_show(value)}")
        return value.strip().upper().removeprefix("T")
    code = props.get("grid:code")
    if code is not None:
        if not isinstance(code, str) or "-" not in code:
            raise MalformedItem(f"properties.grid:code must be like 'MGRS-35TLM', got {_show(code)}")
        scheme, _, tile = code.partition("-")
        tile = tile.strip().upper()
        return tile.removeprefix("T") if scheme.upper() == "MGRS" else tile
    for prefix in ("mgrs", "sentinel"):
        # Earth Search v1 mgrs:* and v0 sentinel:* triples: utm_zone 33, latitude_band "U", grid_square "WP".
        zone, band, square = (props.get(f"{prefix}:{k}") for k in ("utm_zone", "latitude_band", "grid_square"))
        if zone is not None and band is not None and square is not None:
            try:
                return f"{int(zone):02d}{str(band).strip().upper()}{str(square).strip().upper()}"
            except (TypeError, ValueError):
                raise MalformedItem(f"properties.{prefix}:utm_zone must be a zone number, got {_show(zone)}") from None
    path, row = props.get("landsat:wrs_path"), props.get("landsat:wrs_row")
    if path is not None and row is not None:
        try:
            return f"{int(path):03d}{int(row):03d}"
        except (TypeError, ValueError):
            raise MalformedItem(
                f"properties.landsat:wrs_path/row must be numbers or digit strings, got {path!r}/{row!r}"
            ) from None
    return None


def _relative_orbit(props: dict[str, Any], item_id: str) -> int | None:
    for name in ("sat:relative_orbit", "sentinel2:relative_orbit_number"):
        value = props.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise MalformedItem(f"properties.{name} must be an integer, got {_show(value)}")
            return value
    # Earth Search lacks sat:relative_orbit; the product URI (and PC ids) carry it as _Rnnn_.
    for text in (*(props.get(k) for k in identity.PRODUCT_ID_KEYS), item_id):
        if isinstance(text, str):
            match = _ORBIT_RE.search(text)
            if match:
                return int(match.group(1))
    return None


def _generation_epoch(props: dict[str, Any], item_id: str) -> float:
    for key in ("s2:generation_time", "sentinel2:generation_time", "landsat:product_generated", "updated",
                "created"):
        value = props.get(key)
        if value is None:
            continue
        return parse_datetime(value, f"properties.{key}").timestamp()
    # PC ids end with the generation time (…_20201007T214652).
    match = re.search(r"_(\d{8}T\d{6})$", item_id)
    if match:
        return datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC).timestamp()
    return 0.0


def _sequence(props: dict[str, Any], item_id: str) -> int:
    name = "s2:sequence" if props.get("s2:sequence") is not None else "sentinel:sequence"
    value = props.get(name)
    if value is not None:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise MalformedItem(f"properties.{name} must be an integer, got {_show(value)}") from None
    match = _SEQUENCE_RE.search(item_id)
    return int(match.group(1)) if match else 0


# --- assets ----------------------------------------------------------------------------------------


def asset_keys_for(catalogue: CatalogueSettings, collection: str | None, profile: CollectionProfile,
                   raw_assets: dict[str, Any]) -> dict[str, str]:
    """Logical band -> asset key: the catalogue's mapping for this collection, else its catalogue-wide
    mapping, else the collection profile's, else (unknown collections) the assets' eo:bands common names."""
    if collection is not None and collection in catalogue.collection_asset_keys:
        return dict(catalogue.collection_asset_keys[collection])
    if catalogue.asset_keys is not None:
        return dict(catalogue.asset_keys)
    if profile.asset_keys:
        return dict(profile.asset_keys)
    return generic_asset_keys(raw_assets)


def normalise_assets(item: dict[str, Any], catalogue: CatalogueSettings, baseline: str | None, *,
                     profile: CollectionProfile = GENERIC, collection: str | None = None) -> dict[str, Any]:
    """Logical band -> {href, scale, offset, radiometry, nodata, type}, via the collection's asset-key map.

    ``scale``/``offset`` and the ``radiometry`` record (rule, profile, whether the +1000 DN offset is in
    the pixels) are decided here from the item's flags, baseline and ``raster:bands``
    (:func:`eo.radiometry.decide`); the workers check them against the pixels.

    Hrefs are checked statically here (scheme, allow-listed host, IP literals; no DNS): an asset the
    service would refuse to open is not kept, and an item left without a cloud mask, red or NIR is refused.
    :func:`eo.security.check_href` runs again, with DNS, right before any read.
    """
    raw_assets = item.get("assets")
    if not isinstance(raw_assets, dict):
        raise MalformedItem(f"assets must be an object, got {_show(raw_assets)}")
    base = _self_href(item)
    props = item.get("properties") if isinstance(item.get("properties"), dict) else {}
    mapping = asset_keys_for(catalogue, collection, profile, raw_assets)
    out: dict[str, Any] = {}
    refused: list[str] = []
    for band, key in mapping.items():
        asset = raw_assets.get(key)
        if asset is None:
            continue
        if not isinstance(asset, dict) or not isinstance(asset.get("href"), str) or not asset["href"]:
            raise MalformedItem(f"assets.{key}.href must be a non-empty string")
        href = asset["href"]
        if base and "://" not in href:
            href = urljoin(base, href)
        try:
            check_href(href, catalogue, resolve=False, sign=False)
        except HrefRefused as exc:
            refused.append(f"{band}: {exc}")
            continue
        out[band] = _asset_entry(band, key, asset, href, baseline, profile, props)
    has_mask = any(b in out for b in MASK_BANDS)
    missing = [b for b in REQUIRED_BANDS if b not in out]
    if not has_mask or missing:
        need = ([] if has_mask else ["scl or qa_pixel"]) + missing
        detail = f"; refused hrefs: {'; '.join(refused)}" if refused else ""
        raise MalformedItem(
            f"assets: no usable {', '.join(need)} (asset keys {sorted(raw_assets)[:12]}, "
            f"mapping {mapping}, profile {profile.name}){detail}"
        )
    return out


def _self_href(item: dict[str, Any]) -> str | None:
    links = item.get("links")
    if isinstance(links, list):
        for link in links:
            if isinstance(link, dict) and link.get("rel") == "self" and isinstance(link.get("href"), str):
                return link["href"]
        # No self link: the canonical one says where the item lives (relative hrefs resolve against it).
        for link in links:
            if isinstance(link, dict) and link.get("rel") == "canonical" and isinstance(link.get("href"), str):
                return link["href"]
    return None


def _asset_entry(band: str, key: str, asset: dict[str, Any], href: str, baseline: str | None,
                 profile: CollectionProfile, props: dict[str, Any]) -> dict[str, Any]:
    bands = asset.get("raster:bands")
    first = bands[0] if isinstance(bands, list) and bands and isinstance(bands[0], dict) else {}
    nodata = first.get("nodata", 0)
    if not isinstance(nodata, int | float) or isinstance(nodata, bool):
        nodata = 0
    entry: dict[str, Any] = {"href": href, "asset_key": key, "nodata": nodata}
    if band in NON_REFLECTANCE:
        entry.update(scale=_num(first.get("scale"), 1.0), offset=_num(first.get("offset"), 0.0))
    else:
        entry.update(radiometry.decide(profile, props, asset, baseline).as_asset_fields())
    if isinstance(asset.get("type"), str):
        entry["type"] = asset["type"]
    return entry


def _num(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return default
    return float(value)
