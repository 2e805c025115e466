"""Chaos runs that need no services (issue 17 item 7, partial): R5 generated area inputs, R6 hostile hrefs.

    PYTHONPATH=. python benchmarks/chaos.py [--inputs 5000]

R5 feeds generated GeoJSON/WKT/name inputs through the CLI's parsing and validation path
(``read_source`` → ``parse_areas`` → ``validate_name``); a pass is a result or a one-line
``AreaGeometryError``/``AreaError``; anything else, or an error message that is not one line, counts
in the tracebacks column. R6 runs hostile hrefs through
``check_href``; every one must be refused. R1–R4 (worker kill, broker/DB restarts, STAC faults, SMTP)
are covered by tests/test_workers_recovery.py, tests/test_poll_consistency.py, tests/test_reports.py and
tests/test_deliveries_attention.py, not yet by this script. Prints a table; last line ``name: value``.
"""

from __future__ import annotations

import argparse
import json
import os

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
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=5000)
    args = parser.parse_args()
    rows = {"R5 area inputs": r5(args.inputs), "R6 hostile hrefs": r6()}
    print(f"{'run':<20}{'tries':>8}{'passed':>8}{'lost':>6}{'dup':>6}{'tracebacks':>12}")
    for name, r in rows.items():
        print(f"{name:<20}{r['tries']:>8}{r['passed']:>8}{r['lost']:>6}{r['duplicated']:>6}{r['tracebacks']:>12}")
    print(f"tracebacks: {sum(r['tracebacks'] for r in rows.values())}")


if __name__ == "__main__":
    main()
