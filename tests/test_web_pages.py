"""The map pages on the real app and database (TestClient): login first, another user's area is not
found, everything escaped, a CSP on every page, nothing loaded from another host, the vendored files
present and reproducible by scripts/vendor-web. The browser flow itself is tests/test_web_browser.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from core.db import session_scope
from core.models import Area
from tests import factories
from tests.fixtures_web import PASSWORD

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def login(client, account) -> str:
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    r = client.post("/login", data={"email": account.email, "password": PASSWORD, "csrf": token},
                    follow_redirects=False)
    assert r.status_code == 303
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get("/").text).group(1)


def owned_world(database_url: str, owner_id: int, **kw) -> tuple[int, int]:
    """factories.world owned by ``owner_id``: (analysis id, area id)."""
    with session_scope(database_url) as session:
        an = factories.world(session, **kw)
        session.get(Area, an.area_id).owner_id = owner_id
        return an.id, an.area_id


class _Refs(HTMLParser):
    """Every src/href of a page: none may leave the app (no CDN)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def refs(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.refs


def test_pages_need_a_login_and_come_back_after_it(web_client, alice):
    for path in ("/", "/areas/1", "/analyses/1", "/findings"):
        r = web_client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/login?next={path}", path
    # An API token is for the API: it does not log a page in.
    r = web_client.get("/", headers=alice.auth(), follow_redirects=False)
    assert r.headers["location"] == "/login?next=/"
    login(web_client, alice)
    assert web_client.get("/").status_code == 200


def test_area_and_analysis_pages_show_the_pair_timeline_swipe_and_answers(web_client, alice, web_db):
    analysis_id, area_id = owned_world(web_db, alice.id, name="Apuseni forest")
    login(web_client, alice)
    index = web_client.get("/").text
    assert f'<a href="/areas/{area_id}">Apuseni forest</a>' in index

    page = web_client.get(f"/areas/{area_id}").text
    assert re.search(r'data-kind="clear" data-scene-id="\d+"', page)
    # The timeline names the analysis of the after scene and why that pair was chosen.
    assert f'<a href="/analyses/{analysis_id}">analysis {analysis_id}</a> (done)' in page
    assert "latest earlier clear scene of tile 34TFS, relative orbit 36 (clear 96 %)" in page
    assert "2015-08-31 → 2020-08-29" in page

    page = web_client.get(f"/analyses/{analysis_id}").text
    assert 'id="swipe"' in page
    summary = re.search(r'src="/api/findings/(\d+)/images/before.png"', page).group(1)
    assert f'src="/api/findings/{summary}/images/after.png"' in page
    assert web_client.get(f"/api/findings/{summary}/images/before.png").content == factories.png("before")
    assert "A new forest road and two clear-cuts appear." in page
    assert "<dt>Has forest been cleared?</dt>" in page and "<strong>Yes</strong>" in page
    assert page.count('<tr data-class="vegetation_loss" data-state="">') == 1
    assert page.count('<tr data-class="new_built_up_or_bare" data-state="">') == 1


def test_the_add_form_shows_the_api_defaults_and_the_banner_names_every_added_area(web_client, alice, web_db):
    """The form's thresholds are those `areas add` and the API give an area that sets none (the Area column
    defaults, 80 % and 0.7, not numbers of the template's own); ?added= names each created area."""
    csrf = login(web_client, alice)
    page = web_client.get("/").text
    assert re.search(r'name="max_cloud_cover"[^>]*value="80"', page)
    assert re.search(r'name="min_clear_fraction"[^>]*value="0.7"', page)
    assert "fill only what a feature does not set" in page
    ids = []
    for name in ("North field", "South field", "West <field>"):
        r = web_client.post("/api/areas", json={"type": "Feature", "properties": {"name": name}, "geometry": {
            "type": "Polygon", "coordinates": [[[23.1, 46.5], [23.2, 46.5], [23.2, 46.6], [23.1, 46.5]]]}},
            headers={"X-CSRF-Token": csrf})
        assert r.status_code == 201, r.text
        ids.append(r.json()["features"][0]["id"])
    with session_scope(web_db) as session:
        assert (session.get(Area, ids[0]).max_cloud_cover, session.get(Area, ids[0]).min_clear_fraction) == (80, 0.7)

    def banner(query: str) -> str:
        html = web_client.get(f"/?{query}").text
        return " ".join(re.search(r'<p class="notice" role="status" id="added">(.*?)</p>', html, re.S).group(1).split())

    assert banner(f"added={ids[0]}") == ("Added the area “North field”. Its first acquisitions are looked at on the "
                                         "next catalogue poll.")
    assert banner(f"added={ids[0]}&added={ids[1]}") == (
        "Added 2 areas: “North field” and “South field”. Their first acquisitions are looked at on the next "
        "catalogue poll.")
    assert banner("&".join(f"added={i}" for i in ids)) == (
        "Added 3 areas: “North field”, “South field” and “West &lt;field&gt;”. Their first acquisitions are "
        "looked at on the next catalogue poll.")


def test_another_users_area_and_analysis_are_not_found(web_client, alice, bob, web_db):
    analysis_id, area_id = owned_world(web_db, bob.id, name="Bob's forest")
    login(web_client, alice)
    for path in (f"/areas/{area_id}", f"/analyses/{analysis_id}"):
        r = web_client.get(path)
        assert r.status_code == 404 and "Bob" not in r.text, path
    assert "Bob&#39;s forest" not in web_client.get("/findings").text
    assert 'id="no-findings"' in web_client.get("/findings").text


def test_names_captions_and_answers_are_escaped(web_client, alice, web_db):
    analysis_id, area_id = owned_world(web_db, alice.id, name=HOSTILE, caption=HOSTILE, answers=[
        {"question": HOSTILE, "answer": HOSTILE, "confidence": 0.5, "statistics": {}}])
    login(web_client, alice)
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"
    seen = {}
    for path in ("/", f"/areas/{area_id}", f"/analyses/{analysis_id}", "/findings"):
        r = web_client.get(path)
        assert r.status_code == 200, path
        assert "<script>alert" not in r.text and "<img src=x" not in r.text, path
        seen[path] = (escaped in r.text, "\\u003cscript\\u003e" in r.text)
    # Every page shows the text HTML-escaped; the three that hand their data to app.js as JSON also carry it
    # there with < and > as \\u003c / \\u003e (the findings page has no such JSON).
    assert seen == {"/": (True, True), f"/areas/{area_id}": (True, True), f"/analyses/{analysis_id}": (True, True),
                    "/findings": (True, False)}
    # The JSON handed to app.js cannot close its <script> element either.
    data = web_client.get(f"/analyses/{analysis_id}").text.split('id="page-data">')[1]
    assert "</script>" not in data.split("</script>")[0] and "\\u003c/script\\u003e" in data


def test_every_page_has_a_csp_and_loads_nothing_from_elsewhere(web_client, alice, web_db):
    analysis_id, area_id = owned_world(web_db, alice.id)
    login(web_client, alice)
    for path in ("/login", "/", f"/areas/{area_id}", f"/analyses/{analysis_id}", "/findings", "/api/docs"):
        r = web_client.get(path)
        assert r.status_code == 200, path
        external = [u for u in refs(r.text) if re.match(r"(https?:)?//", u)]
        assert external == [], (path, external)
        if path != "/api/docs":  # swagger-ui's page is FastAPI's, with its inline start-up script
            csp = r.headers["content-security-policy"]
            assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp, path
    docs = web_client.get("/api/docs").text
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in docs and '"validatorUrl": null' in docs
    for url in [u for u in refs(docs) + refs(web_client.get("/").text) if u.startswith("/static/")]:
        assert web_client.get(url).status_code == 200, url


def test_the_basemap_host_is_allowed_for_images_only(web_db):
    from fastapi.testclient import TestClient

    from tests.fixtures_web import web_settings
    from web.app import create_app
    from web.templating import tile_origin

    assert tile_origin("https://{s}.tile.example.org/{z}/{x}/{y}.png") == "https://*.tile.example.org"
    assert tile_origin("") == "" and tile_origin("javascript:alert(1)") == ""
    app = create_app(web_settings(web_db, basemap_url="https://tile.openstreetmap.org/{z}/{x}/{y}.png"))
    with TestClient(app) as client:
        r = client.get("/login")
    csp = r.headers["content-security-policy"]
    assert "img-src 'self' data: blob: https://tile.openstreetmap.org;" in csp
    assert "connect-src 'self';" in csp and "script-src 'self';" in csp
    assert 'data-basemap-url="https://tile.openstreetmap.org/{z}/{x}/{y}.png"' in r.text


def test_no_basemap_unless_configured_and_the_shipped_config_credits_osm(monkeypatch):
    """The default asks the browser for no third-party tiles; config/unirs.toml (production) names
    OpenStreetMap explicitly, with the attribution its tile policy requires."""
    from pathlib import Path

    from core.config import Settings

    for var in ("UNIRS_CONFIG", "UNIRS_WEB__BASEMAP_URL", "UNIRS_WEB__BASEMAP_ATTRIBUTION"):
        monkeypatch.delenv(var, raising=False)
    default = Settings().web
    assert (default.basemap_url, default.basemap_attribution) == ("", "")
    monkeypatch.setenv("UNIRS_CONFIG", str(Path(__file__).resolve().parents[1] / "config" / "unirs.toml"))
    shipped = Settings().web
    assert (shipped.basemap_url, shipped.basemap_attribution) == (
        "https://tile.openstreetmap.org/{z}/{x}/{y}.png", "© OpenStreetMap contributors")


def test_findings_page_filters_and_links_the_exports(web_client, alice, web_db):
    _, area_id = owned_world(web_db, alice.id)
    login(web_client, alice)
    page = web_client.get(f"/findings?area_id={area_id}&kind=region").text
    assert page.count("<tr data-finding-id=") == 2
    assert f'href="/api/findings?format=csv&amp;area_id={area_id}&amp;kind=region"' in page
    csv = web_client.get(f"/api/findings?format=csv&area_id={area_id}&kind=region")
    assert csv.status_code == 200 and len(csv.text.strip().splitlines()) == 3  # header + two regions
    assert web_client.get("/findings?kind=bogus").status_code == 200  # an unknown kind means "any"


def test_findings_page_says_a_summary_counts_every_class(web_client, alice, web_db):
    # A summary's hectares are the change of every class; its class is only the one that heads it.
    from sqlalchemy import update

    from core.models import Finding

    _, area_id = owned_world(web_db, alice.id)
    with session_scope(web_db) as s:
        s.execute(update(Finding).where(Finding.area_id == area_id, Finding.kind == "summary")
                  .values(change_class="vegetation_loss"))
    login(web_client, alice)
    page = web_client.get(f"/findings?area_id={area_id}&kind=summary").text
    assert page.count("<tr data-finding-id=") == 1
    assert "All classes (led by vegetation loss)</td>" in page and "4.30 ha" in page


def test_vendored_files_match_the_pins_of_scripts_vendor_web():
    script = (STATIC.parent.parent / "scripts" / "vendor-web").read_text()
    versions = (STATIC / "vendor" / "VERSIONS").read_text().split("\n")
    pinned = re.findall(r'^  "(\S+) (\S+) (sha512-\S+)"$', script, re.M)
    assert [tuple(line.split()) for line in versions if line] == pinned
    assert {name for name, _, _ in pinned} == {"leaflet", "@geoman-io/leaflet-geoman-free", "swagger-ui-dist"}
    leaflet = (STATIC / "vendor" / "leaflet" / "leaflet.js").read_text()
    assert leaflet.startswith("/* @preserve\n * Leaflet 1.9.4")
    # The page's own script never writes HTML strings into the page.
    app_js = (STATIC / "app.js").read_text()
    assert "innerHTML" not in app_js and "insertAdjacentHTML" not in app_js


def test_every_route_commits_before_it_answers(web_db):
    """The session of a request is committed when the route returns, before the response goes out
    (``web.deps.DB``: scope="function"). With FastAPI's default scope the commit comes after the response,
    and the map page, which lists the areas right after the 201 of a POST, sometimes missed the new one."""
    from fastapi.routing import APIRoute

    from tests.fixtures_web import web_settings
    from web.app import create_app
    from web.deps import db

    def sessions(dependant):
        for dep in dependant.dependencies:
            if dep.call is db:
                yield dep
            yield from sessions(dep)

    def api_routes(routes):
        for route in routes:
            if isinstance(route, APIRoute):
                yield route
            elif getattr(route, "original_router", None) is not None:  # an included router
                yield from api_routes(route.original_router.routes)

    routes = list(api_routes(create_app(web_settings(web_db)).routes))
    using = {(r.path, tuple(sorted(r.methods))): [d.scope for d in sessions(r.dependant)] for r in routes}
    using = {k: v for k, v in using.items() if v}
    assert ("/api/areas", ("POST",)) in using and ("/", ("GET",)) in using and len(using) > 20
    assert {k: v for k, v in using.items() if set(v) != {"function"}} == {}


def test_the_analysis_page_says_what_later_acquisitions_confirmed_or_dismissed(web_client, alice, web_db):
    """The email is written on first detection; a later clear acquisition confirms or dismisses its regions
    and the page's headline counts what alerts now. Without the states the page (1.10 ha) and the email
    (4.30 ha) seemed to disagree for no reason."""
    from sqlalchemy import update

    from core.models import Finding

    analysis_id, _ = owned_world(web_db, alice.id, name="Apuseni forest")
    with session_scope(web_db) as session:
        for cls, state in (("vegetation_loss", "dismissed"), ("new_built_up_or_bare", "confirmed")):
            session.execute(update(Finding).where(Finding.analysis_id == analysis_id, Finding.change_class == cls)
                            .values(alert_state=state))
    login(web_client, alice)
    page = web_client.get(f"/analyses/{analysis_id}").text
    states = re.search(r'<p id="alert-states" class="hint">(.*?)</p>', page, re.S).group(1)
    assert " ".join(states.split()) == (
        "Its regions of the alerting classes since first detection: 1.10 ha confirmed by the next clear "
        "acquisition; 3.20 ha dismissed: the next clear acquisition no longer showed it. An alert email sent on "
        "first detection counted them as they stood then; the headline above counts what alerts now.")
    assert re.search(r'<h1 id="headline">([^<]*)</h1>', page).group(1) == "Forest loss 1.10 ha"


def test_a_screened_out_region_is_listed_with_its_state_and_not_drawn_as_a_loss(web_client, alice, web_db):
    """A new-user trial: an atmospheric vegetation-loss region (a cloud edge) was drawn red on the map, listed
    without a state, and its class said "alerts: yes"."""
    import json

    from sqlalchemy import select, update

    from core.models import Finding

    analysis_id, _ = owned_world(web_db, alice.id, name="Apuseni forest")
    with session_scope(web_db) as session:
        session.execute(update(Finding).where(Finding.analysis_id == analysis_id,
                                              Finding.change_class == "vegetation_loss")
                        .values(alert_state="atmospheric", screen_verdict="atmospheric"))
        session.execute(update(Finding).where(Finding.analysis_id == analysis_id,
                                              Finding.change_class == "new_built_up_or_bare")
                        .values(alert_state="confirmed", screen_verdict="departure"))
        ids = dict(session.execute(select(Finding.change_class, Finding.id).where(
            Finding.analysis_id == analysis_id, Finding.kind == "region")).all())
    login(web_client, alice)
    page = web_client.get(f"/analyses/{analysis_id}").text

    regions = page.split('<table class="table" id="regions">')[1].split("</table>")[0]
    rows = {int(m.group(2)): (m.group(1), [" ".join(re.sub(r"<[^>]+>", "", c).split())
                                           for c in re.findall(r"<td[^>]*>(.*?)</td>", m.group(3), re.S)])
            for m in re.finditer(r'<tr data-class="[^"]*" data-state="[^"]*"( class="not-a-change")?><td>(\d+)</td>'
                                 r'(.*?)</tr>', regions, re.S)}
    assert {fid: (muted, cells[:5]) for fid, (muted, cells) in rows.items()} == {
        ids["vegetation_loss"]: (' class="not-a-change"', ["vegetation loss", "3.20 ha", "atmospheric", "atmospheric",
                                                           "no"]),
        ids["new_built_up_or_bare"]: (None, ["new built-up land or bare ground", "1.10 ha", "confirmed", "departure",
                                             "yes"]),
    }
    classes = page.split('<table class="table" id="classes">')[1].split("</table>")[0]
    alerts = {re.sub(r"<[^>]+>", "", m.group(1)).strip(): m.group(2).strip() for m in re.finditer(
        r"<tr><td>(.*?)</td>.*?<td>([^<]*)</td></tr>", classes, re.S)}
    assert alerts["vegetation loss"] == "no: atmospheric"
    assert alerts["new built-up land or bare ground"] == "yes"
    # The map draws only the confirmed region; the hint says why the other is missing.
    data = json.loads(page.split('id="page-data">')[1].split("</script>")[0])
    assert [f["id"] for f in data["regions"]] == [ids["new_built_up_or_bare"]]
    assert " ".join(re.search(r'<p class="hint" id="undrawn">(.*?)</p>', page, re.S).group(1).split()) == (
        "1 region(s) dismissed or screened out (seasonal, atmospheric) are not drawn; the change regions table "
        "lists them with their state.")
    # The findings page: the same states, the screened-out row greyed.
    listing = web_client.get("/findings?kind=region").text
    states = {int(m.group(1)): (m.group(2), m.group(3)) for m in re.finditer(
        r'<tr data-finding-id="(\d+)"( class="not-a-change")?>.*?<td class="state">([^<]*)</td>', listing, re.S)}
    assert states == {ids["vegetation_loss"]: (' class="not-a-change"', "atmospheric"),
                      ids["new_built_up_or_bare"]: (None, "confirmed (departure)")}
