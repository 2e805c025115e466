"""Revision 0007 re-keys existing scene rows as granules of acquisitions and merges what turn out to be
versions of one granule (here: Earth Search's and Planetary Computer's copies of one tile, which had two
keys before because their `datetime`s differ by the 36 s between datatake start and tile sensing)."""

import json

import psycopg

from core import migrate
from devtools.dbadmin import sqlalchemy_url
from tests.conftest import create_database, drop_database

PRODUCT = "S2B_MSIL2A_20250731T130249_N0511_R095_T{tile}_20250731T132745"
FOOTPRINT = "SRID=4326;POLYGON((-39 -5,-38 -5,-38 -4,-39 -4,-39 -5))"


def _scene(conn, catalogue: int, key: str, item_id: str, tile: str, when: str, rank: list, props: dict) -> int:
    item = {"id": item_id, "properties": props}
    return conn.execute(
        """INSERT INTO scenes (catalogue_id, collection, acquisition_key, item_id, version_rank, platform, tile,
                               relative_orbit, acquired_at, processing_baseline, footprint, assets, item, versions_seen)
           VALUES (%s, 'sentinel-2-l2a', %s, %s, %s, 'sentinel-2b', %s, 95, %s, '05.11', %s, '{}', %s, 1)
           RETURNING id""",
        (catalogue, key, item_id, json.dumps(rank), tile, when, FOOTPRINT, json.dumps(item))).fetchone()[0]


def test_existing_rows_become_granules_and_copies_merge():
    url = create_database("unirs_test_mig5")
    try:
        sa_url = sqlalchemy_url(url)
        migrate.upgrade(sa_url, "0005")  # rows as they were before 0006 (accounts) and 0007
        with psycopg.connect(url, autocommit=True) as conn:
            es, pc = (conn.execute("INSERT INTO catalogues (name, url) VALUES (%s, %s) RETURNING id",
                                   (n, f"https://{n}.example")).fetchone()[0] for n in ("es", "pc"))
            area = conn.execute(
                "INSERT INTO areas (name, geom, area_km2, status, collections, max_cloud_cover, min_clear_fraction,"
                " recipients, questions, alert_frequency, min_alert_hectares, pairing_policy, properties) VALUES"
                " ('a', ST_Multi(ST_GeomFromText('POLYGON((-38.6 -4.6,-38.5 -4.6,-38.5 -4.5,-38.6 -4.6))', 4326)),"
                " 1, 'active', ARRAY['sentinel-2-l2a'], 80, 0.7, '{}', '{}', 'immediate', 0.5, 'latest', '{}')"
                " RETURNING id").fetchone()[0]
            es_mvv = _scene(conn, es, "sentinel-2b|24MVV|2025-07-31T13:03:25Z", "S2B_24MVV_20250731_0_L2A", "24MVV",
                            "2025-07-31T13:03:25.899Z", [5.11, 1753968465.0, 0.0],
                            {"s2:datatake_id": "GS2B_20250731T130249_043879_N05.11"})
            es_mwv = _scene(conn, es, "sentinel-2b|24MWV|2025-07-31T13:03:24Z", "S2B_24MWV_20250731_0_L2A", "24MWV",
                            "2025-07-31T13:03:24.321Z", [5.11, 1753968465.0, 0.0],
                            {"s2:product_uri": PRODUCT.format(tile="24MWV") + ".SAFE"})
            # PC's copy of 24MVV: datetime is the datatake start, generated later -> it wins the granule.
            pc_mvv = _scene(conn, pc, "sentinel-2b|24MVV|2025-07-31T13:02:49Z", PRODUCT.format(tile="24MVV"), "24MVV",
                            "2025-07-31T13:02:49.024Z", [5.11, 1753968500.0, 0.0], {})
            for scene in (es_mvv, pc_mvv):
                conn.execute("INSERT INTO observations (area_id, scene_id, status, clear_fraction) "
                             "VALUES (%s, %s, 'clear', 0.9)", (area, scene))
            conn.execute("INSERT INTO analyses (idempotency_key, area_id, after_scene_id, analyser, question_set, "
                         "pairing_policy, status, attempts, stats) VALUES ('k', %s, %s, 'spectral@1', '@1', 'latest',"
                         " 'done', 1, '{}')", (area, es_mvv))

        migrate.upgrade(sa_url)
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT s.id, s.granule_key, s.acquisition_key, a.key, s.version_rank "
                                "FROM scenes s JOIN acquisitions a ON a.id = s.acquisition_id ORDER BY s.id").fetchall()
            assert [(r[0], r[1]) for r in rows] == [
                (es_mwv, "sentinel-2b|2025-07-31T13:02:49Z|24MWV"),
                (pc_mvv, "sentinel-2b|2025-07-31T13:02:49Z|24MVV"),
            ]
            assert {r[2] for r in rows} == {r[3] for r in rows} == {"sentinel-2b|2025-07-31T13:02:49Z"}
            assert all(len(r[4]) == 4 for r in rows)
            assert conn.execute("SELECT count(*) FROM acquisitions").fetchone()[0] == 1
            assert conn.execute("SELECT after_scene_id FROM analyses").fetchone()[0] == pc_mvv
            assert conn.execute("SELECT scene_id FROM observations").fetchall() == [(pc_mvv,)]
        migrate.downgrade(sa_url, "0006")
        with psycopg.connect(url) as conn:
            keys = sorted(r[0] for r in conn.execute("SELECT acquisition_key FROM scenes"))
            assert keys == ["sentinel-2b|24MVV|2025-07-31T13:02:49Z", "sentinel-2b|24MWV|2025-07-31T13:03:24Z"]
    finally:
        drop_database(url)
