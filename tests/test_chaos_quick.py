"""The quick form of the chaos suite (benchmarks/chaos.py --quick): R1–R4 with one try each, on the test
session's own services (its database, COG server, STAC API and private redis-server; R2 starts its own
PostgreSQL cluster and Redis), R5 with 300 generated inputs and R6 as in the full form. Every try must
pass: 0 lost, 0 duplicated, 0 tracebacks.
The full form (5 kills, 3 × restarts, 3 rounds of STAC and SMTP faults, 5,000 inputs) is benchmarks/chaos.py."""

from __future__ import annotations

import pytest

from tests.chaos.lab import Lab, Tally
from tests.chaos.mail_runs import FAULTS as SMTP_FAULTS
from tests.chaos.mail_runs import r4_smtp_faults
from tests.chaos.stac_runs import FAULTS as STAC_FAULTS
from tests.chaos.stac_runs import r3_stac_faults
from tests.chaos.workers_runs import r1_worker_kills, r2_service_restarts

pytestmark = pytest.mark.chaos


@pytest.fixture
def lab(db, cog_server, stac_api, worker_redis, tmp_path) -> Lab:
    return Lab(app_url=db, cog_server=cog_server, stac_api=stac_api, redis=worker_redis, workdir=tmp_path)


def assert_clean(tally: Tally, tries: int) -> None:
    assert tally.as_dict() == {"tries": tries, "passed": tries, "lost": 0, "duplicated": 0, "tracebacks": 0}, \
        "\n".join(tally.notes)


def test_r1_a_worker_killed_mid_analysis_loses_and_repeats_nothing(lab):
    assert_clean(r1_worker_kills(lab, kills=1), tries=1)


def test_r2_redis_and_postgres_restarts_mid_run_lose_and_repeat_nothing(lab):
    assert_clean(r2_service_restarts(lab, tries=1, per_try=2), tries=2)


def test_r3_stac_faults_lose_nothing_and_never_skip_the_cursor(lab):
    assert_clean(r3_stac_faults(lab, rounds=1), tries=len(STAC_FAULTS))


def test_r4_smtp_faults_deliver_once_or_fail_with_a_reason(lab):
    assert_clean(r4_smtp_faults(lab, rounds=1), tries=2 * len(SMTP_FAULTS))


def test_r5_generated_area_inputs_and_r6_hostile_hrefs_and_redirects():
    from benchmarks.chaos import HOSTILE, r5, r6

    r5_row = r5(300)
    assert r5_row == {"tries": 300, "passed": 300, "lost": 0, "duplicated": 0, "tracebacks": 0}
    r6_row = r6()
    assert r6_row["tries"] > len(HOSTILE)  # the redirect cases ran too
    assert r6_row == {"tries": r6_row["tries"], "passed": r6_row["tries"], "lost": 0, "duplicated": 0,
                      "tracebacks": 0}
