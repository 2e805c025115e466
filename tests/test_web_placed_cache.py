"""/api/findings/{id}/placed/{role}.png warps a stored thumbnail once, not on every request: a strong ETag
of the stored image, 304 Not Modified on revalidation, the warped bytes kept per process (real app, real
PostGIS, rasterio's warp; the warp count is the real lru_cache's)."""

from __future__ import annotations

from sqlalchemy import select

from core.db import session_scope
from core.models import Area, Finding, FindingImage
from tests import factories
from web import placement

# The 96 × 96 px factory thumbnail on a 10 m grid of UTM zone 34N, inside the factory area (23.1°E, 46.5°N).
BOUNDS = {"crs": "EPSG:32634", "bbox": [509000.0, 5151000.0, 509960.0, 5151960.0], "map_height_px": 96}


def _placeable_summary(web_db: str, owner_id: int) -> int:
    with session_scope(web_db) as session:
        an = factories.world(session)
        session.get(Area, an.area_id).owner_id = owner_id
        summary = session.scalar(select(Finding).where(Finding.analysis_id == an.id, Finding.kind == "summary"))
        for image in summary.images:
            image.bounds = BOUNDS
        return summary.id


def test_placed_chip_is_warped_once_and_revalidated_with_304(web_client, alice, web_db):
    fid = _placeable_summary(web_db, alice.id)
    url = f"/api/findings/{fid}/placed/before.png"
    placement._warped.cache_clear()

    first = web_client.get(url, headers=alice.auth())
    assert first.status_code == 200 and first.content[:8] == b"\x89PNG\r\n\x1a\n"
    etag = first.headers["etag"]
    with session_scope(web_db) as session:
        stored = session.scalar(select(FindingImage).where(FindingImage.finding_id == fid,
                                                           FindingImage.role == "before"))
        assert etag == placement.placed_etag(stored.data, BOUNDS)
        assert first.content == placement.placed_png(stored.data, BOUNDS)  # the same pixels as a fresh warp
    assert first.headers["cache-control"] == "private, no-cache"

    again = web_client.get(url, headers={**alice.auth(), "If-None-Match": etag})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    weak_list = web_client.get(url, headers={**alice.auth(), "If-None-Match": f'"other", W/{etag}'})
    assert weak_list.status_code == 304
    other_browser = web_client.get(url, headers=alice.auth())
    assert (other_browser.status_code, other_browser.content) == (200, first.content)
    info = placement._warped.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # three requests, one warp

    # The after image is another ETag; a re-run that rewrites the before image changes its ETag.
    after = web_client.get(f"/api/findings/{fid}/placed/after.png", headers=alice.auth())
    assert after.status_code == 200 and after.headers["etag"] != etag
    with session_scope(web_db) as session:
        image = session.scalar(select(FindingImage).where(FindingImage.finding_id == fid,
                                                          FindingImage.role == "before"))
        image.data = factories.png("overlay")
    changed = web_client.get(url, headers={**alice.auth(), "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] not in (etag, after.headers["etag"])


def test_another_users_chip_is_not_found_even_with_its_etag(web_client, alice, bob, web_db):
    fid = _placeable_summary(web_db, bob.id)
    url = f"/api/findings/{fid}/placed/before.png"
    etag = web_client.get(url, headers=bob.auth()).headers["etag"]
    assert web_client.get(url, headers={**alice.auth(), "If-None-Match": etag}).status_code == 404
