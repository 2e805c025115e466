"""The end of scripts/demo: the web app left running over the demo database (devtools/demo_web.py) — a
real ``unirs-monitor serve`` on 127.0.0.1, logged into with the printed demo login, showing the area and
its analysis; the next run stops it, and only it."""

from __future__ import annotations

import http.cookiejar
import re
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

from sqlalchemy import select

from core.db import session_scope
from core.models import Area, User
from devtools import demo_web
from tests import factories


def _browser() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                       urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def test_demo_leaves_the_web_app_running_with_a_login_to_the_demo_area(web_db, tmp_path, monkeypatch):
    with session_scope(web_db) as session:
        an = factories.world(session, name="Romanian forest (demo)")
        analysis_id, area_id = an.id, an.area_id
    # Even when the operator's environment names a basemap, the demo's app has none.
    monkeypatch.setenv("UNIRS_WEB__BASEMAP_URL", "https://tile.openstreetmap.org/{z}/{x}/{y}.png")
    app = demo_web.start_web(web_db, tmp_path, port=0, cwd=Path(__file__).resolve().parents[1])
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", app.url)
        assert (app.area_url, app.analysis_url) == (f"{app.url}/areas/{area_id}", f"{app.url}/analyses/{analysis_id}")
        assert (tmp_path / "web-login.txt").read_text().split() == [f"{app.url}/login", app.email, app.password]
        with session_scope(web_db) as session:
            owner = session.scalar(select(User.email).join(Area, Area.owner_id == User.id).where(Area.id == area_id))
        assert owner == demo_web.DEMO_EMAIL

        browser = _browser()
        login = browser.open(f"{app.url}/login").read().decode()
        csrf = re.search(r'name="csrf" value="([^"]+)"', login).group(1)
        form = urllib.parse.urlencode({"email": app.email, "password": app.password, "csrf": csrf,
                                       "next": f"/areas/{area_id}"}).encode()
        with browser.open(f"{app.url}/login", data=form) as resp:
            assert resp.url == app.area_url
            assert "<h1 id=\"area-name\">Romanian forest (demo)" in resp.read().decode()
        with browser.open(app.analysis_url) as resp:
            page = resp.read().decode()
            assert 'id="swipe"' in page
            # Offline: no basemap, so neither the page nor its CSP names a host but this app's.
            assert 'data-basemap-url=""' in page
            assert "img-src 'self' data: blob:; connect-src 'self';" in resp.headers["Content-Security-Policy"]
    finally:
        stopped = demo_web.stop_previous(tmp_path)
    assert stopped == app.pid and not Path(f"/proc/{app.pid}").exists()
    assert not (tmp_path / "web.pid").exists()


def test_a_stale_pid_file_of_another_program_is_left_alone(tmp_path):
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / "web.pid").write_text(f"{other.pid}\n")
        assert demo_web.stop_previous(tmp_path) is None
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    (tmp_path / "web.pid").write_text("not a pid\n")
    assert demo_web.stop_previous(tmp_path) is None
