"""An area's own settings (``AreaOptions``) and the GeoJSON property names they are read from.

Kept apart from monitor/areas.py, with no database or geometry imports, so `unirs-monitor areas add -h`
can list the accepted properties without loading either (see monitor/cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# When an alert goes out: on the first detection, or once the next clear acquisition confirms it.
ALERT_ON = ("probable", "confirmed")


@dataclass
class AreaOptions:
    """Per-area settings. None = keep the current value (update) or use the default (add)."""

    collections: list[str] | None = None
    max_cloud_cover: float | None = None
    min_clear_fraction: float | None = None
    min_covered_fraction: float | None = None  # share of the area an acquisition must image (else "partial")
    recipients: list[str] | None = None
    questions: list[str] | None = None
    alert_frequency: str | None = None
    min_alert_hectares: float | None = None
    pairing_policy: str | None = None
    alert_classes: list[str] | None = None  # change class ids of eo/change_classes.py
    alert_on: str | None = None  # probable | confirmed

    # GeoJSON property names accepted on import, so `areas export` output can be added back.
    PROPERTY_KEYS = (
        "collections", "max_cloud_cover", "min_clear_fraction", "min_covered_fraction", "recipients", "questions",
        "alert_frequency", "min_alert_hectares", "pairing_policy", "alert_classes", "alert_on",
    )

    # Also accepted on import: the name, free attributes, and what `areas export` writes but a new area
    # cannot take over (its old id, status and size).
    NAME_KEY = "name"
    ATTRIBUTES_KEY = "attributes"
    EXPORT_ONLY_KEYS = ("id", "status", "area_km2")
    # Feature ids that GIS tools write as properties (QGIS/GDAL GeoPackage exports: fid; ogr2ogr from
    # PostGIS: ogc_fid, gid; ArcGIS/shapefiles: OBJECTID, FID): ids of the source dataset, not settings.
    FEATURE_ID_KEYS = ("fid", "ogc_fid", "gid", "objectid")

    @classmethod
    def is_feature_id(cls, key: str) -> bool:
        """Whether a property ``key`` is a GIS tool's feature id (compared without case; ``ID`` too)."""
        return key.lower() in (*cls.FEATURE_ID_KEYS, "id")

    @classmethod
    def accepted_keys(cls) -> tuple[str, ...]:
        return (cls.NAME_KEY, *cls.PROPERTY_KEYS, cls.ATTRIBUTES_KEY)

    @classmethod
    def from_properties(cls, props: dict[str, Any]) -> AreaOptions:
        return cls(**{k: props[k] for k in cls.PROPERTY_KEYS if props.get(k) is not None})

    def merged_over(self, base: AreaOptions) -> AreaOptions:
        """These options, with unset fields taken from ``base``."""
        return AreaOptions(**{
            k: getattr(self, k) if getattr(self, k) is not None else getattr(base, k) for k in self.PROPERTY_KEYS
        })
