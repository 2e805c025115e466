"""The web page as a person uses it: Debian's chromium driven by Playwright against ``unirs-monitor serve``
(a subprocess on 127.0.0.1) over a database whose analysis the real pairing and a real Celery worker
wrote from the bundled Sentinel-2 sample COGs (served on loopback).

The flow: log in; see the area on the map and in the list; draw a polygon with leaflet-geoman's tool and
add it with a cloud threshold and recipients; upload a GeoJSON file of two areas (each feature keeps its own
settings, the form fills the rest; the banner names both); reshape one (drag a
corner) and delete the other; change an area's settings; read the acquisition timeline (clear, cloudy
and why, which pair was analysed and why); open the analysis page, drag the before/after swipe and see
the change regions in their class colours; the findings table and its CSV export; the alert email of the
same analysis and its links back into the app. Screenshots are written to
var/test-artifacts/web/ (gitignored) — look at them.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from geoalchemy2.shape import to_shape
from sqlalchemy import select, text

from core.db import session_scope
from core.models import Analysis, Area, Finding, Observation, Scene
from devtools.browser import LOOPBACK_ONLY_FLAGS
from monitor import pairing
from tests.fixtures_web import PASSWORD, make_account
from tests.fixtures_workers import insert_area, insert_sample_scenes, run_until_terminal

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "var" / "test-artifacts" / "web"
# 2015-08-31 clear (no earlier partner), 2016-08-25 cloudy over the sample, 2020-08-29 clear → paired with
# 2015-08-31: the bundled sample's documented clear-cut pair (tests/test_workers_pipeline.py).
DATES = ["2015-08-31", "2016-08-25", "2020-08-29"]
AREA = "Romanian forest (sample)"
# workers/render.py CLASS_COLOURS: the map draws regions in the tints of the overlay image.
CLASS_RGB = {"vegetation_loss": "rgb(230, 30, 30)", "new_built_up_or_bare": "rgb(255, 140, 0)",
             "vegetation_gain": "rgb(40, 220, 60)", "water_change": "rgb(30, 120, 255)"}

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python (dev extra) not installed")
expect = playwright_api.expect
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                "(scripts/bootstrap installs it)")


@pytest.fixture
def sample_world(web_db, worker_settings, cog_server, send_task, start_worker):
    """The sample area owned by alice, its three acquisitions settled by the real pairing and the one pair
    analysed by a real worker: {area_id, analysis_id, alice}."""
    alice = make_account(web_db, "alice@example.org")
    scenes = insert_sample_scenes(worker_settings.catalogues[0], cog_server.url, DATES)
    area_id = insert_area(scenes.footprint.buffer(-0.0003), name=AREA)
    with session_scope(worker_settings) as session:
        area = session.get(Area, area_id)
        area.owner_id, area.min_clear_fraction, area.max_cloud_cover = alice.id, 0.7, 100.0
        session.add_all([Observation(area_id=area_id, scene_id=scenes.ids[d],
                                     acquisition_id=select(Scene.acquisition_id).where(Scene.id == scenes.ids[d])
                                     .scalar_subquery()) for d in DATES])
    pairing.process_pending(worker_settings)
    with session_scope(worker_settings) as session:
        analyses = session.scalars(select(Analysis.id).where(Analysis.area_id == area_id)).all()
    assert len(analyses) == 1, "the sample's pairing should create exactly the 2015 → 2020 analysis"
    rows = run_until_terminal(list(analyses), worker_settings, send_task, workers=[start_worker()])
    assert rows[analyses[0]]["status"] == "done", rows
    return {"area_id": area_id, "analysis_id": analyses[0], "alice": alice}


def _outline_on_the_boundary(png: bytes, bounds: list[list[float]], area_geom) -> None:
    """The yellow outline pixels of a placed chip (RGBA, Web Mercator over ``bounds``) lie on the boundary of
    ``area_geom`` (lon/lat), measured in metres on the area's UTM zone."""
    import io

    import numpy as np
    from PIL import Image
    from pyproj import Transformer

    from workers.mapframe import OUTLINE

    rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    rows, cols = np.nonzero((rgba[..., :3] == OUTLINE).all(axis=-1) & (rgba[..., 3] == 255))
    assert rows.size > 100, "the chip must show the area outline"
    (south, west), (north, east) = bounds
    to_merc = Transformer.from_crs(4326, 3857, always_xy=True)
    (x0, x1), (y0, y1) = to_merc.transform([west, east], [north, south])
    h, w = rgba.shape[:2]
    xs, ys = x0 + (cols + 0.5) * (x1 - x0) / w, y0 + (rows + 0.5) * (y1 - y0) / h
    zone = 32600 + int((area_geom.centroid.x + 180) // 6) + 1
    merc_to_utm = Transformer.from_crs(3857, zone, always_xy=True)
    ux, uy = merc_to_utm.transform(xs, ys)
    from shapely import distance, points, transform

    boundary = transform(area_geom, Transformer.from_crs(4326, zone, always_xy=True).transform,
                         interleaved=False).boundary
    far = float(np.max(distance(boundary, points(ux, uy))))
    warped_px = (x1 - x0) / w
    assert far <= 10.0 + warped_px, f"outline pixels up to {far:.1f} m off the area's boundary"


@pytest.fixture
def browser():
    with playwright_api.sync_playwright() as p:
        # Loopback only: no proxy, no background requests of the browser itself.
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=list(LOOPBACK_ONLY_FLAGS))
        yield chromium
        chromium.close()


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def click_on_map(page, fractions: list[tuple[float, float]]) -> None:
    box = page.locator("#map").bounding_box()
    for fx, fy in fractions:
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        page.wait_for_timeout(150)  # geoman adds the vertex on the click; let it redraw before the next


def test_a_person_logs_in_draws_an_area_and_compares_before_after(served_app, sample_world, browser, tmp_path):
    url, alice = served_app.url, sample_world["alice"]
    area_id, analysis_id = sample_world["area_id"], sample_world["analysis_id"]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    foreign: list[str] = []
    page.on("request", lambda req: None if req.url.startswith((url, "data:", "blob:")) else foreign.append(req.url))

    # Log in: the map page sends an anonymous visitor to the login form and back.
    page.goto(f"{url}/")
    assert page.url == f"{url}/login?next=/"
    page.fill("input[name=email]", alice.email)
    page.fill("input[name=password]", PASSWORD)
    page.click("form.login button[type=submit]")
    page.wait_for_url(f"{url}/")
    expect(page.locator("header form.logout span")).to_have_text(alice.email)
    assert page.locator("#areas tbody tr").all_inner_texts()[0].startswith(AREA)
    expect(page.locator("#map path.leaflet-interactive")).to_have_count(1)  # the area's outline
    shot(page, "1-areas")

    # Draw a quadrilateral with geoman's polygon tool: four corners, then the first again to close it.
    page.click(".leaflet-pm-icon-polygon")
    corners = [(0.40, 0.35), (0.60, 0.33), (0.62, 0.60), (0.42, 0.62)]
    click_on_map(page, [*corners, corners[0]])
    expect(page.locator("#geometry-status")).to_contain_text("drawn")
    page.fill("#new-area input[name=name]", "Drawn <b>clearing</b>")
    page.fill("#new-area input[name=max_cloud_cover]", "35")
    page.fill("#new-area textarea[name=recipients]", "ana@example.org\nforest-watch@example.org")
    shot(page, "2-drawn")
    page.click("#new-area button[type=submit]")
    page.wait_for_url(re.compile(r".*/\?added=\d+$"))
    drawn_id = int(page.url.rsplit("=", 1)[1])
    # The name is text, not markup, everywhere it is shown.
    expect(page.locator("#added")).to_contain_text("Added the area “Drawn <b>clearing</b>”")
    assert page.locator("#areas tbody b").count() == 0
    listed = page.locator("#areas tbody tr td:first-child").all_inner_texts()
    assert sorted(listed) == sorted([AREA, "Drawn <b>clearing</b>"])
    expect(page.locator("#map path.leaflet-interactive")).to_have_count(2)
    shot(page, "3-listed")
    with session_scope(served_app.database_url) as session:
        drawn = session.get(Area, drawn_id)
        sample = session.get(Area, area_id)
        assert (drawn.owner_id, drawn.max_cloud_cover) == (alice.id, 35.0)
        assert drawn.recipients == ["ana@example.org", "forest-watch@example.org"]
        ring = to_shape(drawn.geom).geoms[0].exterior
        # Four corners clicked in the middle of a map fitted to the sample area: a ring of 4 + closing
        # vertex lying over the sample.
        assert len(ring.coords) == 5 and to_shape(sample.geom).intersects(to_shape(drawn.geom))

    # Bad files get the API's one-line message and nothing is added.
    (tmp_path / "notes.geojson").write_text("a shopping list")
    page.set_input_files("#new-area input[name=file]", str(tmp_path / "notes.geojson"))
    expect(page.locator("#new-area-error")).to_contain_text("notes.geojson is not JSON")
    bowtie = tmp_path / "bowtie.geojson"
    bowtie.write_text(json.dumps({"type": "Polygon", "coordinates": [[[23.1, 46.5], [23.2, 46.6], [23.2, 46.5],
                                                                     [23.1, 46.6], [23.1, 46.5]]]}))
    page.set_input_files("#new-area input[name=file]", str(bowtie))
    expect(page.locator("#geometry-status")).to_have_text("Shape from bowtie.geojson.")
    page.fill("#new-area input[name=name]", "bowtie")
    page.click("#new-area button[type=submit]")
    expect(page.locator("#new-area-error")).to_contain_text(
        "invalid geometry: Self-intersection")
    assert "(use ?fix=true to repair it)" in page.locator("#new-area-error").inner_text()
    page.fill("#new-area input[name=name]", "")
    with session_scope(served_app.database_url) as session:
        assert session.scalar(select(Area.id).where(Area.name == "bowtie")) is None
    refusal = [p for p in problems if "422" in p]  # the browser logs the refused POST; that one is expected
    assert len(refusal) == 2 and refusal[0] == f"422 {url}/api/areas?name=bowtie", problems
    problems[:] = [p for p in problems if p not in refusal]

    # Upload a GeoJSON file of two areas: a feature's own settings win, the form fills only what it leaves
    # unset (the form's recipients used to replace the file's: an area alerting nobody).
    upload = tmp_path / "upload.geojson"
    minx, miny, maxx, maxy = ring.bounds
    third = (maxy - miny) / 3

    def strip(y0: float) -> dict:
        return {"type": "Polygon", "coordinates": [[[minx, y0], [maxx, y0], [maxx, y0 + third], [minx, y0 + third],
                                                    [minx, y0]]]}

    upload.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": strip(miny),
         "properties": {"name": "Uploaded strip", "recipients": ["me@example.org"], "max_cloud_cover": 25}},
        {"type": "Feature", "geometry": strip(miny + 2 * third), "properties": {"name": "Second strip"}}]}))
    page.set_input_files("#new-area input[name=file]", str(upload))
    expect(page.locator("#geometry-status")).to_have_text("Shape from upload.geojson.")
    assert page.input_value("#new-area input[name=name]") == ""
    # The form starts at the thresholds `areas add` gives (the Area defaults), not numbers of its own.
    assert page.input_value("#new-area input[name=max_cloud_cover]") == "80"
    assert page.input_value("#new-area input[name=min_clear_fraction]") == "0.7"
    page.fill("#new-area input[name=max_cloud_cover]", "45")
    page.fill("#new-area textarea[name=recipients]", "form@example.org")
    before_upload = page.url
    page.click("#new-area button[type=submit]")
    page.wait_for_url(lambda u: u != before_upload and re.search(r"/\?added=\d+&added=\d+$", u) is not None)
    expect(page.locator("#added")).to_contain_text("Added 2 areas: “Uploaded strip” and “Second strip”.")
    uploaded_id, second_id = (int(part.split("=")[1]) for part in page.url.split("?")[1].split("&"))
    with session_scope(served_app.database_url) as session:
        own, filled = session.get(Area, uploaded_id), session.get(Area, second_id)
        assert (own.name, own.recipients, own.max_cloud_cover, own.min_clear_fraction) == (
            "Uploaded strip", ["me@example.org"], 25.0, 0.7)
        assert (filled.name, filled.recipients, filled.max_cloud_cover, filled.min_clear_fraction) == (
            "Second strip", ["form@example.org"], 45.0, 0.7)

    # Reshape the drawn area: geoman's edit mode, one corner dragged, saved through PATCH.
    page.goto(f"{url}/areas/{drawn_id}")
    page.click("#edit-shape")
    corner = page.locator("#map .marker-icon:not(.marker-icon-middle)").first
    start = corner.bounding_box()
    page.mouse.move(start["x"] + start["width"] / 2, start["y"] + start["height"] / 2)
    page.mouse.down()
    page.mouse.move(start["x"] - 40, start["y"] - 30, steps=6)
    page.mouse.up()
    page.wait_for_selector("#save-shape:not([hidden])")
    shot(page, "3b-reshaping")
    page.click("#save-shape")
    page.wait_for_load_state("load")
    expect(page.locator("#edit-shape")).to_have_text("Edit shape")
    with session_scope(served_app.database_url) as session:
        reshaped = to_shape(session.get(Area, drawn_id).geom)
    assert len(reshaped.geoms[0].exterior.coords) == 5
    moved = set(reshaped.geoms[0].exterior.coords) - set(ring.coords)
    assert len(moved) == 1, "exactly the dragged corner moved"

    # Delete the uploaded one (after the browser's confirmation dialog).
    page.goto(f"{url}/areas/{uploaded_id}")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-area")
    page.wait_for_url(f"{url}/")
    expect(page.locator("#areas tbody")).not_to_contain_text("Uploaded strip")
    with session_scope(served_app.database_url) as session:
        assert session.get(Area, uploaded_id) is None

    # The area page: change the settings through the API (CSRF header from the page), read the timeline.
    page.click(f"#areas a[href='/areas/{area_id}']")
    page.wait_for_url(f"{url}/areas/{area_id}")
    page.fill("#area-settings input[name=max_cloud_cover]", "55")
    page.fill("#area-settings textarea[name=recipients]", "ops@example.org")
    page.click("#area-settings button[type=submit]")
    page.wait_for_selector("#settings-saved:not([hidden])")
    with session_scope(served_app.database_url) as session:
        sample = session.get(Area, area_id)
        assert (sample.max_cloud_cover, sample.recipients) == (55.0, ["ops@example.org"])
    kinds = page.locator("#timeline tbody tr").evaluate_all("rows => rows.map(r => r.dataset.kind)")
    assert kinds == ["clear", "cloudy", "clear"]  # newest first: 2020, 2016, 2015
    cloudy = page.locator("#timeline tbody tr[data-kind=cloudy]").inner_text()
    assert "below the area's minimum 70%" in cloudy
    newest = page.locator("#timeline tbody tr").first.inner_text()
    assert newest.startswith("2020-08-29") and f"analysis {analysis_id} (done)" in newest
    with session_scope(served_app.database_url) as session:
        pair_reason = session.get(Analysis, analysis_id).pair_reason
    assert pair_reason and pair_reason in newest
    shot(page, "4-area")

    # The analysis page: the stored thumbnails load, the swipe follows the mouse, regions in class colours.
    page.click(f"#timeline a[href='/analyses/{analysis_id}']")
    page.wait_for_url(f"{url}/analyses/{analysis_id}")
    page.wait_for_function("(imgs => imgs.length === 3 && imgs.every(i => i.complete))"
                           "([...document.querySelectorAll('#swipe img')])")
    sizes = page.locator("#swipe img.before, #swipe img.after").evaluate_all(
        "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
    assert len(sizes) == 2 and sizes[0] == sizes[1] and sizes[0][0] > 50
    assert page.locator("#swipe").get_attribute("data-split") == "50.0"
    box = page.locator("#swipe").bounding_box()
    page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + 0.25 * box["width"], box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    assert abs(float(page.locator("#swipe").get_attribute("data-split")) - 25.0) < 1.0
    clip = page.locator("#swipe .before-clip").evaluate("n => getComputedStyle(n).clipPath")
    assert re.fullmatch(r"inset\(0px 7[45](\.\d+)?% 0px 0px\)", clip), clip
    assert page.input_value("#swipe-range") == "25"
    shot(page, "5-analysis-swipe-25")
    assert not page.locator("#swipe img.overlay").is_visible()
    page.check("#show-overlay")
    assert page.locator("#swipe img.overlay").is_visible()
    page.fill("#swipe-range", "80")
    assert page.locator("#swipe").get_attribute("data-split") == "80.0"
    shot(page, "6-analysis-overlay-80")

    # The before/after chips lie on the map where they were imaged: the warped PNGs span exactly the bounds
    # the page was given (Leaflet's own projection of them), and the area outline the worker drew into the
    # chips falls on the area's boundary (within one 10 m thumbnail pixel plus one warped pixel: 10.9 m of
    # 13.0 here; the unwarped chip stretched over the lat/lon box of its UTM corners is 18.3 m off).
    page.wait_for_function("(imgs => imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0))"
                           "([...document.querySelectorAll('#map img.placed-before, #map img.placed-after')])")
    placed = page.evaluate("JSON.parse(document.getElementById('page-data').textContent).placed")
    assert sorted(placed) == ["after", "before"]
    for role in ("before", "after"):
        (south, west), (north, east) = placed[role]["bounds"]
        drawn = page.locator(f"#map img.placed-{role}").bounding_box()
        corners = page.evaluate("([s, w, n, e]) => { const m = document.getElementById('map').getBoundingClientRect();"
                                " const p = window.unirs.map.latLngToContainerPoint([n, w]);"
                                " const q = window.unirs.map.latLngToContainerPoint([s, e]);"
                                " return [m.x + p.x, m.y + p.y, m.x + q.x, m.y + q.y]; }", [south, west, north, east])
        assert [drawn["x"], drawn["y"], drawn["x"] + drawn["width"], drawn["y"] + drawn["height"]] == pytest.approx(
            corners, abs=1.0)
    assert page.locator("#map img.placed-before").evaluate("n => n.style.clipPath") == "inset(0px 20% 0px 0px)"
    with session_scope(served_app.database_url) as session:
        area_geom = to_shape(session.get(Area, area_id).geom)
    _outline_on_the_boundary(page.request.get(url + placed["before"]["url"]).body(), placed["before"]["bounds"],
                             area_geom)

    with session_scope(served_app.database_url) as session:
        regions = session.execute(select(Finding.change_class).where(
            Finding.analysis_id == analysis_id, Finding.kind == "region")).scalars().all()
        caption = session.scalar(select(Finding.caption).where(Finding.analysis_id == analysis_id,
                                                               Finding.kind == "summary"))
        answers = session.scalar(select(text("count(*)")).select_from(Finding).where(
            Finding.analysis_id == analysis_id, Finding.kind == "answer"))
    assert regions, "the 2015 → 2020 pair of the sample has clear-cuts"
    expect(page.locator("#map path.leaflet-interactive")).to_have_count(len(regions) + 1)
    strokes = page.locator("#map path.leaflet-interactive").evaluate_all(
        "ps => ps.map(p => getComputedStyle(p).stroke)")
    assert sorted(strokes[1:]) == sorted(CLASS_RGB[c] for c in regions)  # [0] is the area outline
    assert page.locator("#regions tbody tr").count() == len(regions)
    if caption:
        assert page.locator("#caption").inner_text() == caption
    assert page.locator("#answers dt").count() == answers

    # Findings table and its exports, with the session cookie.
    page.goto(f"{url}/findings?area_id={area_id}")
    with session_scope(served_app.database_url) as session:
        total = session.scalar(select(text("count(*)")).select_from(Finding).where(Finding.area_id == area_id))
    assert page.locator("#findings tbody tr").count() == total
    csv = page.request.get(url + page.get_attribute("#export-csv", "href"))
    assert csv.status == 200 and len(csv.text().strip().splitlines()) == total + 1
    geojson = page.request.get(url + page.get_attribute("#export-geojson", "href")).json()
    assert len(geojson["features"]) == total
    shot(page, "7-findings")

    assert foreign == [], f"requests left the app: {foreign}"
    assert problems == [], problems

    # The alert email the reports job renders for the same analysis (web links on; inline images as data
    # URIs, as a mail client shows them): its map button opens the analysis page, "Manage alerts" the area.
    from datetime import UTC, datetime

    from core.models import Delivery
    from monitor.reports.immediate import create_immediate_deliveries
    from monitor.reports.links import email_links
    from monitor.reports.runner import render_delivery
    from tests.fixtures_web import web_settings

    settings = web_settings(served_app.database_url, public_url=url)
    with session_scope(settings) as session:
        assert create_immediate_deliveries(session, datetime.now(UTC), settings) == 1
        delivery = session.scalars(select(Delivery).where(Delivery.analysis_id == analysis_id)).one()
        assert delivery.recipient == "ops@example.org"
        email = render_delivery(session, delivery, settings, email_links(settings.web, area_id, delivery.recipient))
    html = email.html
    for image in email.images:
        html = html.replace(f"cid:{image.cid}",
                            f"data:{image.mime_type};base64,{base64.b64encode(image.data).decode()}")
    mail = context.new_page()  # the same browser profile: still logged in
    mail.set_viewport_size({"width": 800, "height": 1200})
    mail.set_content(html)
    assert mail.locator("img").evaluate_all("imgs => imgs.filter(i => i.naturalWidth > 0).length") == len(email.images)
    shot(mail, "8-alert-email")
    mail.click("text=Open the changes on the map")
    mail.wait_for_url(f"{url}/analyses/{analysis_id}")
    expect(mail.locator("#swipe img.after")).to_have_count(1)
    mail.set_content(html)  # back to the message
    mail.click("text=Manage alerts")
    mail.wait_for_url(f"{url}/areas/{area_id}")
    expect(mail.locator("#area-name")).to_contain_text(AREA)
