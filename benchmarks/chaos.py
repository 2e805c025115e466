"""The chaos suite (issue 17 item 7): R1–R6, one command, one table.

    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py            # full: ~5 min on a 2-core machine
    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --quick    # what tests/test_chaos_quick.py runs
    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --only R3,R6

R1 worker ``kill -9`` mid-analysis, R2 Redis and PostgreSQL restarts mid-run (private instances on free
ports), R3 STAC faults through a loopback fault proxy, R4 SMTP down / 4xx / 5xx (aiosmtpd): see the
modules in tests/chaos/ for what each try does and how it is scored. Everything they need is started
here from nothing (throw-away databases on ``UNIRS_TEST_ADMIN_URL``, loopback subprocesses) and dropped at
the end. R5 feeds generated GeoJSON/WKT/name inputs through the CLI's parsing and validation path
(``read_source`` → ``parse_areas`` → ``validate_name``); a pass is a result or a one-line
``AreaGeometryError``/``AreaError``; anything else, or an error message that is not one line, counts
in the tracebacks column. R6 runs hostile hrefs through ``check_href``; every one must be refused.

Prints a table (tries, passed, lost, duplicated, tracebacks), the notes of every try that did not pass,
and last the line ``chaos_not_passed: N`` (tries that did not pass plus every loss, duplicate and
traceback; 0 is the goal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.config import CatalogueSettings
from eo.security import HrefRefused, check_href
from monitor.areas import AreaError, validate_name
from monitor.geometry import AreaGeometryError, parse_areas, read_source

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6))
positions = st.lists(numbers, min_size=0, max_size=5)
rings = st.lists(positions, max_size=8)
docs = st.one_of(
    rings.map(lambda r: {"type": "Polygon", "coordinates": [r]}),
    st.lists(rings, max_size=3).map(lambda rs: {"type": "MultiPolygon", "coordinates": [rs]}),
    st.recursive(st.none() | st.booleans() | numbers | st.text(max_size=5),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                     ["type", "coordinates", "features", "geometry", "properties", "name"]), c, max_size=4),
                 max_leaves=20),
)
texts = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"(MULTI)?POLYGON ?[ZM]{0,2} ?\(\([0-9 ,.\-()e]{0,60}", fullmatch=True),
    st.binary(max_size=40).map(os.fsdecode),
    st.integers(1, 1200).map(lambda n: "[" * n + "]" * n),
    st.sampled_from(["~nosuchuser/a.geojson", "~", "/no/such.wkt", "-"]),
)


def r5(count: int) -> dict[str, int]:
    row = {"tries": 0, "passed": 0, "lost": 0, "duplicated": 0, "tracebacks": 0}
    failures: list[str] = []

    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(source=st.one_of(docs.map(lambda d: json.dumps(d, allow_nan=True)), texts),
           name=st.one_of(st.text(max_size=30), st.binary(max_size=10).map(os.fsdecode)))
    def one(source: str, name: str) -> None:
        row["tries"] += 1
        try:
            parse_areas(read_source(source), fix=True, max_vertices=100_000)
            validate_name(name)
        except (AreaGeometryError, AreaError) as exc:
            if "\n" in str(exc) or not str(exc).strip():
                row["tracebacks"] += 1
                failures.append(f"not one line: {exc!r}")
                return
        except Exception as exc:
            row["tracebacks"] += 1
            failures.append(f"{type(exc).__name__}: {exc} for {source[:60]!r}")
            return
        row["passed"] += 1

    one()
    for line in failures[:10]:
        print("R5", line)
    return row


HOSTILE = ["file:///etc/passwd", "http://169.254.169.254/latest/meta-data/", "https://127.0.0.1/a.tif",
           "https://2130706433/a.tif", "https://0x7f.1/a.tif", "https://[::1]/a.tif", "https://[::ffff:127.0.0.1]/x",
           "/vsicurl/https://example.com/a.tif", "https://user:pw@sentinel-cogs.example/a.tif",
           "https://evil.example/a.tif", "https://sentinel-cogs.example.evil.example/a.tif",
           "https://sentinel-cogs.example\\@evil.example/a.tif", "https://sentinel-cogs.example/a.tif\r\nX: y",
           "ftp://sentinel-cogs.example/a.tif", "gopher://sentinel-cogs.example/", "a.tif", "",
           "https://localhost/a.tif", "https://10.0.0.1/a.tif", "https://192.168.1.1/a.tif", "https://0/a.tif"]


def r6() -> dict[str, int]:
    """Hostile hrefs through ``check_href``, then asset reads redirected off the allow-list (real servers:
    the allowed hop on 127.0.0.1, the sample COGs on 127.0.0.2, which must never be asked)."""
    cat = CatalogueSettings(name="chaos", url="https://stac.example", allowed_hosts=["sentinel-cogs.example",
                                                                                   "127.0.0.1", "localhost",
                                                                                   "10.0.0.1", "192.168.1.1"])
    row = {"tries": 0, "passed": 0, "lost": 0, "duplicated": 0, "tracebacks": 0}
    for href in HOSTILE:
        row["tries"] += 1
        try:
            check_href(href, cat, resolve=False, sign=False)
            print("R6 accepted:", href)
        except HrefRefused:
            row["passed"] += 1
        except Exception as exc:
            row["tracebacks"] += 1
            print("R6", type(exc).__name__, exc, href)
    for name, outcome in r6_redirects():
        row["tries"] += 1
        if outcome == "refused":
            row["passed"] += 1
        elif outcome.startswith("traceback"):
            row["tracebacks"] += 1
            print("R6", name, outcome)
        else:
            print("R6", name, outcome)
    return row


def r6_redirects() -> list[tuple[str, str]]:
    """(case, "refused" | what went wrong) for each redirect case; a control read through an allowed
    redirect must succeed first, so a refusal is the policy and not a broken server."""
    from shapely.geometry import shape

    from devtools import localstac
    from eo.cog import CogReadError, read_aoi
    from tests.fixtures_egress import RangeFileServer, Redirector
    from tests.fixtures_ingest import inner_aoi

    red = "cogs/2020-08-29/red.tif"
    cat = CatalogueSettings(name="local", url="http://127.0.0.1:9", allowed_schemes=["http"],
                            allowed_hosts=["127.0.0.1"], allow_private_hosts=True)
    aoi = inner_aoi(shape(localstac.read_sample_items()[0]["geometry"]))
    local_file = (localstac.SAMPLE_DATA_DIR / red).resolve()
    out: list[tuple[str, str]] = []
    with RangeFileServer(localstac.SAMPLE_DATA_DIR) as files, \
            RangeFileServer(localstac.SAMPLE_DATA_DIR, host="127.0.0.2") as elsewhere:
        with Redirector(lambda path: files.url + path) as allowed:
            if read_aoi(f"{allowed.url}/{red}", aoi, catalogue=cat).array.size == 0:
                return [("control", "the allowed redirect read nothing")]
        cases = [(f"{status} to 127.0.0.2", lambda path: elsewhere.url + path, status, 1)
                 for status in (301, 302, 303, 307, 308)]
        cases += [("302 chain 127.0.0.1 -> 127.0.0.1 -> 127.0.0.2", lambda path: elsewhere.url + path, 302, 2),
                  ("302 to file://", lambda path: f"file://{local_file}", 302, 1),
                  ("302 to 127.0.0.2 by IPv4-mapped IPv6", lambda path: f"http://[::ffff:127.0.0.2]:"
                   f"{elsewhere.server.server_address[1]}{path}", 302, 1)]
        for name, target, status, hops in cases:
            before = len(elsewhere.requests)
            with Redirector(target, status=status) as last:
                first = Redirector(lambda path, last=last: last.url + path, status=status) if hops == 2 else None
                start = first.__enter__() if first else last
                try:
                    read_aoi(f"{start.url}/{red}", aoi, catalogue=cat)
                    outcome = "read succeeded"
                except (HrefRefused, CogReadError):
                    outcome = "refused"
                except Exception as exc:
                    outcome = f"traceback {type(exc).__name__}: {exc}"
                finally:
                    if first:
                        first.__exit__(None, None, None)
            if len(elsewhere.requests) > before:
                outcome = f"127.0.0.2 was asked {elsewhere.requests[before:]}"
            out.append((name, outcome))
    return out


FULL = {"R1": 5, "R2": 3, "R3": 3, "R4": 3, "R5": 5000}
QUICK = {"R1": 1, "R2": 1, "R3": 1, "R4": 1, "R5": 300}
NAMES = {"R1": "R1 worker kill -9", "R2": "R2 redis+pg restart", "R3": "R3 STAC faults", "R4": "R4 SMTP faults",
         "R5": "R5 area inputs", "R6": "R6 hrefs+redirects"}


def run_services(wanted: list[str], sizes: dict[str, int], workdir: Path) -> dict[str, dict]:
    """R1–R4 in one laboratory; returns {name: row with notes}."""
    from tests.chaos.lab import standalone_lab
    from tests.chaos.mail_runs import r4_smtp_faults
    from tests.chaos.stac_runs import r3_stac_faults
    from tests.chaos.workers_runs import r1_worker_kills, r2_service_restarts

    runs = {"R1": r1_worker_kills, "R2": r2_service_restarts, "R3": r3_stac_faults, "R4": r4_smtp_faults}
    rows: dict[str, dict] = {}
    with standalone_lab(workdir) as lab:
        for key in wanted:
            started = time.monotonic()
            tally = runs[key](lab, sizes[key])
            rows[key] = {**tally.as_dict(), "notes": tally.notes, "seconds": time.monotonic() - started}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small form tests/test_chaos_quick.py runs")
    parser.add_argument("--only", default="R1,R2,R3,R4,R5,R6", help="comma-separated runs, e.g. R3,R6")
    parser.add_argument("--inputs", type=int, default=None, help="R5 inputs (default 5000, quick 300)")
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    if args.inputs is not None:
        sizes["R5"] = args.inputs
    wanted = [k.strip().upper() for k in args.only.split(",") if k.strip()]
    unknown = sorted(set(wanted) - set(NAMES))
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {sorted(NAMES)}")
    rows: dict[str, dict] = {}
    services = [k for k in wanted if k in ("R1", "R2", "R3", "R4")]
    if services:
        with tempfile.TemporaryDirectory(prefix="unirs-chaos-") as tmp:
            rows.update(run_services(services, sizes, Path(tmp)))
    if "R5" in wanted:
        started = time.monotonic()
        rows["R5"] = {**r5(sizes["R5"]), "seconds": time.monotonic() - started}
    if "R6" in wanted:
        started = time.monotonic()
        rows["R6"] = {**r6(), "seconds": time.monotonic() - started}

    print(f"{'run':<22}{'tries':>7}{'passed':>8}{'lost':>6}{'dup':>6}{'tracebacks':>12}{'seconds':>9}")
    for key in wanted:
        r = rows[key]
        print(f"{NAMES[key]:<22}{r['tries']:>7}{r['passed']:>8}{r['lost']:>6}{r['duplicated']:>6}"
              f"{r['tracebacks']:>12}{r['seconds']:>9.0f}")
    for key in wanted:
        for note in rows[key].get("notes", [])[:20]:
            print(key, note)
    bad = sum(r["tries"] - r["passed"] + r["lost"] + r["duplicated"] + r["tracebacks"] for r in rows.values())
    print(f"chaos_not_passed: {bad}")


if __name__ == "__main__":
    main()
