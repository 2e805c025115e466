"""The screen's atmospheric tests (workers/atmosphere.py) on real dates of the full 140-date Sentinel-2 cube.

Same set-up as tests/test_screen.py (its ``all_dates`` fixture: the all-dates build served over loopback
HTTP): the demo's forest, its clear history every date with at most 10 % SCL cloud, the pairs analysed in
acquisition order by the real pipeline. The two dates are the false alerts of the benchmark
(benchmarks/bench_alerts.py) before these tests existed; the cut dates are where the reference
(benchmarks/reference) has loss and must still alert.
"""

from __future__ import annotations

import pytest

from core.models import Finding
from tests.fixtures_workers import insert_area, insert_observation, insert_sample_scenes, truncate
from tests.test_screen import ALL_DATES, all_dates, analyse_pairs  # noqa: F401  (all_dates: the module-scoped COG server)

PAIRS = [("2016-05-07", "2016-05-27"),  # first year: cloud margins inside a cloud shadow, SCL clear
         ("2017-04-12", "2017-06-06"),  # the 2017 road and patches on their first leaf-on date
         ("2018-05-02", "2018-05-22"),  # a new clearing in the west
         ("2018-07-21", "2018-08-15"),  # a cloud band with colour fringes, SCL clear
         ("2020-04-16", "2020-05-11")]  # the 2020 south patches
LOSS = ("vegetation_loss", "new_built_up_or_bare")


@pytest.fixture(scope="module")
def screened(database_url, worker_settings, all_dates):  # noqa: F811
    from devtools import localstac

    truncate(database_url)
    items = localstac.read_sample_items(ALL_DATES)
    clear = sorted(it["properties"]["datetime"][:10] for it in items if it["properties"]["eo:cloud_cover"] <= 10)
    needed = sorted({d for pair in PAIRS for d in pair} | set(clear))
    scenes = insert_sample_scenes(worker_settings.catalogues[0], all_dates.url, needed, data_dir=ALL_DATES)
    area_id = insert_area(scenes.footprint.buffer(-0.0006), name="Romanian forest")
    for day in sorted(set(clear) | {a for _, a in PAIRS}):
        if day <= PAIRS[-1][1]:
            insert_observation(area_id, scenes.ids[day])
    return {after: [r for r in rows if r.change_class in LOSS]
            for after, rows in analyse_pairs(worker_settings, area_id, scenes.ids, PAIRS).items()}


def alerting(rows: list[Finding]) -> list[Finding]:
    return [r for r in rows if r.alert_state in ("probable", "confirmed") and r.hectares >= 0.2]


def test_first_year_cloud_margins_are_haze_not_loss(screened):
    rows = screened["2016-05-27"]
    # The fallback (no harmonic model in the first year) sees a relative NDVI fall of ≈ −0.38 on 4.43 ha in
    # three regions ≥ 0.2 ha; their blue rose at least as much as their red over the lit forest: haze.
    big = sorted((r for r in rows if r.hectares >= 0.2), key=lambda r: -r.hectares)
    assert [round(r.hectares, 2) for r in big] == [2.86, 0.92, 0.65]
    for r in big:
        sc = r.statistics["screen"]
        assert sc["method"] == "scene-normalised dNDVI"
        assert (r.screen_verdict, r.alert_state, sc["atmosphere"]) == ("atmospheric", "atmospheric", "haze")
        assert sc["hazy_share"] >= 0.5 and sc["blue_red_lift"] > 0.95
    assert not alerting(rows)


def test_a_colour_fringe_beside_a_cloud_band_is_a_cloud_edge(screened):
    rows = screened["2018-08-15"]
    # 0.19 ha since every clear date of the history is co-registered (abc41bc): 0.41 ha read as imaged.
    fringe = next(r for r in rows if round(r.hectares, 2) == 0.19)
    sc = fringe.statistics["screen"]
    # Red-lifted like bare ground (lift ratio ≈ 0.6), but 30 m from the haze regions of the same date.
    assert (fringe.screen_verdict, sc["atmosphere"]) == ("atmospheric", "cloud edge")
    assert sc["cloud_edge_share"] >= 0.5 and sc["edge_m"] == 90.0
    assert not alerting(rows)


@pytest.mark.parametrize(("day", "largest_ha", "alerting_ha"),
                         # Co-registered (2017-06-06, a 2B date, moved a row north): the rims that joined the road
                         # and the patches into one 3.67 ha region are gone (1.44 + 1.20 + 0.58 ha); 2020-05-11 was
                         # 0.52 / 2.52 ha with only the pairs' dates registered.
                         [("2017-06-06", 1.44, 3.22), ("2018-05-22", 0.32, 0.32), ("2020-05-11", 0.51, 2.47)])
def test_real_cuts_still_alert(screened, day, largest_ha, alerting_ha):
    # Bare patches are red: their red rose 3 .. 7 × over the lit forest's, their blue far less, and they lie
    # hundreds of metres from any cloud. Every loss region of these dates stays a departure.
    rows = alerting(screened[day])
    assert round(max(r.hectares for r in rows), 2) == largest_ha
    assert sum(r.hectares for r in rows) == pytest.approx(alerting_ha, abs=0.015)
    for r in rows:
        assert r.screen_verdict == "departure"
    assert not [r for r in screened[day] if r.screen_verdict == "atmospheric"]
