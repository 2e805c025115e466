"""The HTTP API: every access rule (anonymous 401, another user's area 404, token scopes, CSRF, login
rate limit) and areas CRUD with the CLI's validation, on the real app and database."""

from __future__ import annotations

import re

from click.testing import CliRunner
from shapely.geometry import shape
from sqlalchemy import select

from core.db import session_scope
from core.models import ApiToken, Area, Finding, User
from monitor.cli import cli
from tests import factories
from tests.fixtures_web import PASSWORD, make_account

SQUARE = {"type": "Polygon", "coordinates": [[[23.1, 46.5], [23.1, 46.6], [23.2, 46.6], [23.2, 46.5], [23.1, 46.5]]]}


def feature(name: str, **props) -> dict:
    return {"type": "Feature", "properties": {"name": name, **props}, "geometry": SQUARE}


def test_anonymous_requests_get_401(web_client):
    for path in ("/api/areas", "/api/areas/1", "/api/analyses/1", "/api/findings", "/api/me"):
        r = web_client.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert web_client.post("/api/areas", json=feature("x")).status_code == 401
    bad = web_client.get("/api/areas", headers={"Authorization": "Bearer unirs_0123456789ab_" + "x" * 43})
    assert bad.status_code == 401 and "invalid or revoked" in bad.json()["detail"]


def test_create_list_update_delete_an_area(web_client, alice):
    r = web_client.post("/api/areas", json=feature("Apuseni", recipients=["Me@Example.org"], max_cloud_cover=60),
                        headers=alice.auth())
    assert r.status_code == 201, r.text
    created = r.json()["features"][0]
    assert created["properties"]["name"] == "Apuseni"
    assert created["properties"]["recipients"] == ["Me@example.org"]
    assert created["properties"]["max_cloud_cover"] == 60
    assert created["properties"]["owner_id"] == alice.id
    # The input ring was clockwise; RFC 7946 output is counter-clockwise.
    ring = shape(created["geometry"]).geoms[0].exterior
    assert ring.is_ccw
    area_id = created["id"]

    listed = web_client.get("/api/areas", headers=alice.auth(read_only=True)).json()
    assert [f["id"] for f in listed["features"]] == [area_id]

    r = web_client.patch(f"/api/areas/{area_id}", json={"min_clear_fraction": 0.9, "name": "Apuseni N"},
                         headers=alice.auth())
    assert r.status_code == 200, r.text
    assert r.json()["properties"]["min_clear_fraction"] == 0.9 and r.json()["properties"]["name"] == "Apuseni N"
    assert web_client.post(f"/api/areas/{area_id}/pause", headers=alice.auth()).json()["properties"]["status"] \
        == "paused"
    assert web_client.post(f"/api/areas/{area_id}/resume", headers=alice.auth()).json()["properties"]["status"] \
        == "active"
    r = web_client.put(f"/api/areas/{area_id}/recipients", json={"recipients": ["a@example.org", "b@example.org"]},
                       headers=alice.auth())
    assert r.json()["properties"]["recipients"] == ["a@example.org", "b@example.org"]
    r = web_client.put(f"/api/areas/{area_id}/questions", json={"questions": ["vegetation_loss"]}, headers=alice.auth())
    assert r.status_code == 200 and r.json()["properties"]["questions"] == ["vegetation_loss"]

    r = web_client.patch(f"/api/areas/{area_id}", json={"recipient": ["x@example.org"]}, headers=alice.auth())
    assert r.status_code == 422 and "recipient" in r.json()["detail"]
    assert web_client.delete(f"/api/areas/{area_id}", headers=alice.auth()).status_code == 204
    assert web_client.get(f"/api/areas/{area_id}", headers=alice.auth()).status_code == 404


def test_geometry_refusals_name_the_api_parameter_that_repairs_them(web_client, alice):
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}
    r = web_client.post("/api/areas", json=feature("bad") | {"geometry": bowtie}, headers=alice.auth())
    assert r.status_code == 422 and r.json()["detail"].endswith("(use ?fix=true to repair it)")
    r = web_client.post("/api/areas?fix=true", json=feature("bad") | {"geometry": bowtie}, headers=alice.auth())
    assert r.status_code == 201  # the parameter named is the one that repairs it
    bad_id = r.json()["features"][0]["id"]
    r = web_client.patch(f"/api/areas/{bad_id}", json={"geometry": bowtie}, headers=alice.auth())
    assert r.status_code == 422 and r.json()["detail"].endswith("(use ?fix=true to repair it)")
    r = web_client.patch(f"/api/areas/{bad_id}?fix=true", json={"geometry": bowtie}, headers=alice.auth())
    assert r.status_code == 200


def test_refusals_carry_the_cli_messages(web_client, alice):
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}
    r = web_client.post("/api/areas", json={"type": "FeatureCollection", "features": [
        feature("ok"), {"type": "Feature", "properties": {"name": "bad"}, "geometry": bowtie}]}, headers=alice.auth())
    assert r.status_code == 422
    assert r.json()["detail"] == ("feature 2 ('bad'): invalid geometry: Self-intersection[0.5 0.5] "
                                  "(use ?fix=true to repair it)")
    r = web_client.post("/api/areas", json=feature("x", max_cloud_cover=130), headers=alice.auth())
    assert r.json()["detail"] == "feature ('x'): max cloud cover must be a percentage in [0, 100], got 130"
    r = web_client.post("/api/areas", json=feature("y", recipients=["not-an-address"]), headers=alice.auth())
    assert r.status_code == 422 and "is not a valid email address" in r.json()["detail"]
    r = web_client.patch("/api/areas/1", json={"recipient": ["x@example.org"]}, headers=alice.auth())
    assert r.status_code == 404  # nothing to patch yet; the key check needs an area of one's own
    r = web_client.post("/api/areas", json=feature("z", questions=["no_such_question"]), headers=alice.auth())
    assert r.status_code == 422 and "unknown question template" in r.json()["detail"]
    # All or nothing: nothing of the refused batches was stored.
    assert web_client.get("/api/areas", headers=alice.auth()).json()["features"] == []


def test_refusals_name_the_api_parameters_not_the_cli_flags(web_client, alice):
    """The CLI's messages name its flags (--name, --union, --keep-unknown-properties, --name-property); the
    API's name its own query parameters, or nothing where it has no such way (PATCH)."""
    two = {"type": "FeatureCollection", "features": [feature("a"), feature("b")]}
    r = web_client.post("/api/areas?name=Both", json=two, headers=alice.auth())
    assert r.status_code == 422
    assert r.json()["detail"] == ("?name= given but the input has 2 features; use ?union=true, or name each "
                                  "feature with a 'name' property")
    r = web_client.post("/api/areas", json=feature("c", recipent=["x@example.org"]), headers=alice.auth())
    assert r.json()["detail"] == (
        "feature ('c'): unknown property 'recipent' (did you mean 'recipients'?); accepted: name, collections, "
        "max_cloud_cover, min_clear_fraction, min_covered_fraction, recipients, questions, alert_frequency, "
        "min_alert_hectares, pairing_policy, alert_classes, alert_on, attributes "
        "(?keep_unknown_properties=true stores others as attributes)")
    r = web_client.post("/api/areas", json={"type": "Feature", "properties": {}, "geometry": SQUARE},
                        headers=alice.auth())
    assert r.json()["detail"] == "feature: an area needs a non-empty name (?name=, or a 'name' property per feature)"
    # ?union=true with ?name=: one area of both features, named by the parameter.
    r = web_client.post("/api/areas?name=Both&union=true", json=two, headers=alice.auth())
    assert r.status_code == 201 and [f["properties"]["name"] for f in r.json()["features"]] == ["Both"]
    area_id = r.json()["features"][0]["id"]
    r = web_client.patch(f"/api/areas/{area_id}", json={"recipent": ["x@example.org"]}, headers=alice.auth())
    assert r.status_code == 422 and r.json()["detail"].endswith("alert_on, attributes")  # no flag, no parameter
    r = web_client.patch(f"/api/areas/{area_id}", json={"name": " "}, headers=alice.auth())
    assert r.json()["detail"] == "an area needs a non-empty name (a 'name' property per feature)"


def test_another_users_area_is_404_and_admins_see_all(web_client, alice, bob, web_db):
    area_id = web_client.post("/api/areas", json=feature("Alice's"), headers=alice.auth()).json()["features"][0]["id"]
    with session_scope(web_db) as session:
        an = factories.world(session, name="Bob's forest")
        session.get(Area, an.area_id).owner_id = bob.id
        bob_area, bob_analysis = an.area_id, an.id
    for method, path in [("get", f"/api/areas/{area_id}"), ("patch", f"/api/areas/{area_id}"),
                         ("delete", f"/api/areas/{area_id}"), ("post", f"/api/areas/{area_id}/pause"),
                         ("get", f"/api/areas/{area_id}/observations"), ("get", f"/api/areas/{area_id}/analyses")]:
        r = web_client.request(method, path, headers=bob.auth(), json={} if method == "patch" else None)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["detail"] == f"no area {area_id}"
    assert web_client.get(f"/api/analyses/{bob_analysis}", headers=alice.auth()).status_code == 404
    # Bob's thumbnails, as stored and as placed on the map: his own, not found for Alice (not "no image").
    with session_scope(web_db) as session:
        summary = session.scalar(select(Finding.id).where(Finding.analysis_id == bob_analysis,
                                                          Finding.kind == "summary"))
    assert web_client.get(f"/api/findings/{summary}/images/before.png", headers=bob.auth()).status_code == 200
    for path in (f"/api/findings/{summary}/images/before.png", f"/api/findings/{summary}/placed/before.png"):
        r = web_client.get(path, headers=alice.auth())
        assert (r.status_code, r.json()["detail"]) == (404, f"no finding {summary}"), path
    assert web_client.get("/api/findings", headers=alice.auth()).json()["features"] == []
    assert len(web_client.get("/api/findings", headers=bob.auth()).json()["features"]) == 5
    assert [f["id"] for f in web_client.get("/api/areas", headers=bob.auth()).json()["features"]] == [bob_area]

    admin = make_account(web_db, "root@example.org", admin=True)
    ids = {f["id"] for f in web_client.get("/api/areas", headers=admin.auth()).json()["features"]}
    assert ids == {area_id, bob_area}


def test_read_scope_cannot_write(web_client, alice):
    r = web_client.post("/api/areas", json=feature("ro"), headers=alice.auth(read_only=True))
    assert r.status_code == 403 and "write" in r.json()["detail"]
    assert web_client.get("/api/areas", headers=alice.auth(read_only=True)).status_code == 200


def test_observations_analyses_and_images(web_client, alice, web_db):
    with session_scope(web_db) as session:
        an = factories.world(session)
        session.get(Area, an.area_id).owner_id = alice.id
        area_id, analysis_id = an.area_id, an.id
    obs = web_client.get(f"/api/areas/{area_id}/observations", headers=alice.auth()).json()
    assert [o["acquired_at"][:10] for o in obs] == ["2020-08-29", "2015-08-31"]
    assert [o["status"] for o in obs] == ["clear", "clear"]
    assert obs[0]["clear_fraction"] == 0.88
    assert obs[0]["analyses"][0]["id"] == analysis_id and "latest earlier clear scene" in obs[0]["analyses"][0][
        "pair_reason"]
    detail = web_client.get(f"/api/analyses/{analysis_id}", headers=alice.auth()).json()
    assert detail["caption"] == "A new forest road and two clear-cuts appear."
    assert [f["properties"]["change_class"] for f in detail["regions_geojson"]["features"]] == [
        "vegetation_loss", "new_built_up_or_bare"]
    assert set(detail["images"]) == {"before", "after", "overlay"}
    png = web_client.get(detail["images"]["after"], headers=alice.auth())
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # Stored without bounds (as before revision 0018): nothing to place on a map.
    assert detail["placed_images"] == {}
    fid = detail["images"]["after"].split("/")[3]
    assert web_client.get(f"/api/findings/{fid}/placed/after.png", headers=alice.auth()).status_code == 404
    csv = web_client.get("/api/findings?format=csv", headers=alice.auth())
    assert csv.text.splitlines()[0].startswith("id,analysis_id,area,kind")
    assert len(csv.text.splitlines()) == 6


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_browser_login_session_csrf_and_rate_limit(web_client, alice):
    page = web_client.get("/login")
    token = _csrf(page.text)
    # A form posted without the session's CSRF token is refused before the password is looked at.
    assert web_client.post("/login", data={"email": alice.email, "password": PASSWORD, "csrf": "forged"}) \
        .status_code == 403
    r = web_client.post("/login", data={"email": alice.email, "password": PASSWORD, "csrf": token},
                        follow_redirects=False)
    assert r.status_code == 303
    me = web_client.get("/api/me").json()
    assert me["email"] == alice.email and me["via"] == "session"
    # Session requests that change something need the CSRF header too.
    assert web_client.post("/api/areas", json=feature("s")).status_code == 403
    # Logging in started a new session: the token of the anonymous one is void, the page carries the new one.
    assert web_client.post("/api/areas", json=feature("s"), headers={"X-CSRF-Token": token}).status_code == 403
    fresh = _csrf(web_client.get("/login").text)
    assert fresh != token
    assert web_client.post("/api/areas", json=feature("s"), headers={"X-CSRF-Token": fresh}).status_code == 201


def test_login_rate_limit(web_client, alice, web_db):
    token = _csrf(web_client.get("/login").text)
    for _ in range(5):
        r = web_client.post("/login", data={"email": alice.email, "password": "wrong password!", "csrf": token})
        assert r.status_code == 401 and "wrong e-mail address or password" in r.text
    r = web_client.post("/login", data={"email": alice.email, "password": PASSWORD, "csrf": token})
    assert r.status_code == 429
    with session_scope(web_db) as session:
        assert session.get(User, alice.id) is not None


def test_tokens_are_stored_hashed_and_shown_once(web_client, alice, web_db):
    r = web_client.post("/api/tokens", json={"name": "ci", "scopes": ["read"]}, headers=alice.auth())
    assert r.status_code == 201
    token = r.json()["token"]
    assert web_client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).json()["scopes"] == ["read"]
    with session_scope(web_db) as session:
        stored = list(session.scalars(select(ApiToken.token_hash)))
    assert all(h.startswith("$argon2id$") for h in stored) and token not in stored


def test_openapi_and_health(web_client):
    spec = web_client.get("/api/openapi.json").json()
    assert "/api/areas" in spec["paths"] and "/api/areas/{area_id}/observations" in spec["paths"]
    assert web_client.get("/healthz").json() == {"status": "ok"}


def test_operator_cli_creates_users_and_tokens(web_client, web_db, monkeypatch):
    monkeypatch.setenv("UNIRS_DATABASE_URL", web_db)
    runner = CliRunner()
    r = runner.invoke(cli, ["users", "add", "Carol@Example.org", "--admin"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert r.exit_code == 0, r.output
    assert "carol@example.org (admin) created" in r.output
    again = runner.invoke(cli, ["users", "add", "carol@example.org", "--no-password"])
    assert again.exit_code == 1 and "a user carol@example.org already exists" in again.output
    r = runner.invoke(cli, ["users", "token", "carol@example.org", "--scope", "read"])
    token = r.output.strip().splitlines()[-1]
    assert re.fullmatch(r"unirs_[0-9a-f]{12}_[A-Za-z0-9_-]+", token)
    me = web_client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).json()
    assert me == {"id": me["id"], "email": "carol@example.org", "admin": True, "scopes": ["read"], "via": "token"}
    r = runner.invoke(cli, ["users", "revoke", token.split("_")[1]])
    assert r.exit_code == 0
    assert web_client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    # Areas added with the CLI belong to the operator account.
    r = runner.invoke(cli, ["areas", "add", "POLYGON((23.1 46.5, 23.2 46.5, 23.2 46.6, 23.1 46.6, 23.1 46.5))",
                            "--name", "cli area"])
    assert r.exit_code == 0, r.output
    with session_scope(web_db) as session:
        owner = session.scalar(select(User.email).join(Area, Area.owner_id == User.id).where(Area.name == "cli area"))
    assert owner == "operator@localhost"
