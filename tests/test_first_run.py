"""The README's "Run it for your own areas", command by command, on a fresh database.

The commands are read from the README's code block itself (so the README cannot drift from what works):
every ``unirs-monitor …`` line runs as a real process, in order, as a new operator's shell would run it —
``&`` lines as background services (the scheduler and a Celery worker), ``a && b`` one after the other.
The installation and service lines (bootstrap, setup-services) are what the test session already did;
the catalogue is the local STAC API with two real Sentinel-2 acquisitions instead of Earth Search.
Nothing may print a traceback; the services must report healthy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from shapely.geometry import box, mapping

from tests.conftest import create_database, drop_database
from tests.fixtures_ingest import inner_aoi, loopback_catalogue

ROOT = Path(__file__).resolve().parent.parent
UNIRS = [str(Path(sys.executable).with_name("unirs-monitor"))]
DATES = ("2020-08-04", "2020-08-29")


def readme_commands() -> list[tuple[list[str], bool]]:
    """(argv, background) for each `unirs-monitor` command of the section's first bash block, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Run it for your own areas", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = []
    for line in block.splitlines():
        tokens = shlex.split(line, comments=True)
        background = bool(tokens) and tokens[-1] == "&"
        tokens = tokens[:-1] if background else tokens
        parts: list[list[str]] = [[]]
        for token in tokens:
            parts.append([]) if token == "&&" else parts[-1].append(token)
        commands += [(part[1:], background) for part in parts if part[:1] == ["unirs-monitor"]]
    return commands


def the_operators_areas(footprint, collection: str) -> dict:
    aoi = inner_aoi(footprint)
    minx, miny, maxx, maxy = aoi.bounds
    mid = (miny + maxy) / 2
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": mapping(box(minx, mid, maxx, maxy)),
         "properties": {"name": "North field", "max_cloud_cover": 100, "collections": [collection]}},
        {"type": "Feature", "geometry": mapping(box(minx, miny, maxx, mid)),
         "properties": {"name": "South field", "collections": [collection], "attributes": {"farm": "Vale"}}},
    ]}


def wait_for_final_analyses(url: str, services: list[tuple[subprocess.Popen, Path]]) -> None:
    """Until the database holds analyses and all of them are done, skipped or failed (the scheduler
    dispatches, the worker analyses); a service that exits stops the wait with its log."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        while True:
            with engine.connect() as conn:
                open_, total = conn.execute(text(
                    "SELECT count(*) FILTER (WHERE status NOT IN ('done', 'skipped', 'failed')), count(*) "
                    "FROM analyses")).one()
            if total and not open_:
                return
            for service, log in services:
                assert service.poll() is None, log.read_text()
            time.sleep(1)
    finally:
        engine.dispose()


def test_the_readme_path_on_a_fresh_database(stac_collection, items_by_date, sample_footprint, worker_redis,
                                              tmp_path):
    commands = readme_commands()
    assert [c[0][:2] for c in commands] == [
        ["db", "upgrade"], ["doctor"], ["areas", "add"], ["areas", "list"], ["backfill", "North field"],
        ["scheduler"], ["worker", "--queues"], ["health", "scheduler"], ["health", "worker"], ["findings"],
    ]
    for date in DATES:
        stac_collection.publish(items_by_date[date])
    (tmp_path / "my-areas.geojson").write_text(json.dumps(the_operators_areas(sample_footprint, stac_collection.id)))

    libpq = create_database("unirs_first_run")
    from devtools.dbadmin import sqlalchemy_url

    # A new operator's shell: none of the test session's UNIRS_* settings, the shipped TOML file, and the
    # variables the README's step 2 tells them to set.
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIRS_")}
    env.update({
        "UNIRS_CONFIG": str(ROOT / "config" / "unirs.toml"),
        "UNIRS_DATABASE_URL": sqlalchemy_url(libpq),
        "UNIRS_BROKER_URL": worker_redis.url.rsplit("/", 1)[0] + "/3",  # a broker database of its own
        "UNIRS_CATALOGUES": json.dumps([loopback_catalogue(stac_collection.api.url, [stac_collection.id])
                                        .model_dump(mode="json")]),
        "UNIRS_SMTP__OUTBOX_DIR": str(tmp_path / "outbox"),
        "UNIRS_SMTP__SENDER": "Forest watch <alerts@your-domain.example>",  # the README's export
        "UNIRS_ANALYSIS__DISPATCH_INTERVAL_SECONDS": "1",
        "PYTHONPATH": str(ROOT),
    })
    services: list[tuple[subprocess.Popen, Path]] = []
    outputs: dict[str, str] = {}
    try:
        for args, background in commands:
            if background:
                log = tmp_path / f"{args[0]}.log"
                with open(log, "wb") as out:
                    services.append((subprocess.Popen([*UNIRS, *args], env=env, cwd=tmp_path, stdout=out,
                                                      stderr=subprocess.STDOUT, start_new_session=True), log))
                continue
            # Services take a few seconds to come up, and the first analysis a little longer: an operator
            # would re-run health and findings; so does the test (the deadline only stops a hung test).
            retry = args[0] == "health"
            if args[0] == "findings":  # what it prints is decided once the backfilled pair's analysis is final
                wait_for_final_analyses(sqlalchemy_url(libpq), services)
            deadline = time.monotonic() + 240
            while True:
                proc = subprocess.run([*UNIRS, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                                      timeout=600)
                assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
                done = proc.returncode == 0
                if done or not retry:
                    break
                for service, log in services:
                    assert service.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"{args}: {proc.stdout}{proc.stderr}\n{outputs}\n" + "\n".join(
                    log.read_text()[-3000:] for _, log in services)
                time.sleep(1)
            assert proc.returncode == 0, f"{shlex.join(args)}:\n{proc.stdout}{proc.stderr}"
            outputs[" ".join(args[:2])] = proc.stdout
            if args[0] != "backfill":  # backfill draws progress bars on stderr; the others log nothing
                assert proc.stderr == "", f"{shlex.join(args)} logged:\n{proc.stderr}"
        for _, log in services:
            assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        for service, _ in services:
            if service.poll() is None:
                os.killpg(service.pid, signal.SIGTERM)
        for service, _ in services:
            try:
                service.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(service.pid, signal.SIGKILL)
                service.wait(10)
        drop_database(libpq)

    assert outputs["db upgrade"].startswith("database at head")
    doctor = outputs["doctor"].splitlines()
    assert doctor and all(line.startswith("ok") for line in doctor), outputs["doctor"]
    assert outputs["areas add"].splitlines() == [
        line for line in outputs["areas add"].splitlines() if line.startswith("added area")
    ] and len(outputs["areas add"].splitlines()) == 2
    listed = outputs["areas list"].splitlines()
    assert listed[0].split()[:3] == ["id", "name", "status"]
    assert any("North field" in line and "me@example.org" in line for line in listed[1:])
    assert "items seen: 2" in outputs["backfill North field"], outputs["backfill North field"]
    # The backfilled pair (North field, 2020-08-04 -> 2020-08-29, analysed by the worker before `findings`
    # ran): no change of the minimum mapping unit, so one summary and the five default questions' answers.
    header, *rows = [line.split() for line in outputs["findings"].splitlines()]
    assert header == ["id", "observed", "area", "kind", "class", "hectares", "state", "screen", "text"]
    assert [row[:5] for row in rows] == [
        [str(i), "2020-08-29", "North", "field", "answer"] for i in (6, 5, 4, 3, 2)] + [
        ["1", "2020-08-29", "North", "field", "summary"]]
    assert " ".join(rows[-1][5:]) == "0.00 No significant change: no changed region of at least 0.1 ha…"
