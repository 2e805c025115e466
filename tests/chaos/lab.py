"""The chaos suite's laboratory: the services a run needs, its own throw-away instances, and the tally.

- :class:`Lab`: a migrated application database, the sample COG server, the local STAC API (pgstac) and
  a private ``redis-server``. Inside pytest it is built from the session fixtures
  (tests/test_chaos_quick.py); :func:`standalone_lab` builds the same from nothing for benchmarks/chaos.py.
- :class:`PrivatePostgres`: a PostgreSQL cluster of the suite's own (``initdb`` in a temporary directory,
  ``postgres`` on a free 127.0.0.1 port, trust auth, socket in the data directory), so R2 can stop and
  start "the database" without touching the machine's shared server on 5432.
- :class:`Tally`: one row of the table (tries, passed, lost, duplicated, tracebacks) plus the notes that
  explain each non-pass.

Every process started here is started as our child and ended by its PID (never by name).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from core import migrate
from core.config import AnalysisSettings, Settings, SmtpSettings
from core.db import reset_engines
from devtools import dbadmin, localstac
from tests.fixtures_workers import LEASE_SECONDS, RedisServer, loopback_catalogue

ADMIN_URL = os.environ.get("UNIRS_TEST_ADMIN_URL", "postgresql://unirs:unirs@127.0.0.1:5432/postgres")


@dataclass
class Tally:
    """One line of the chaos table; ``notes`` say why a try did not pass (printed under the table)."""

    tries: int = 0
    passed: int = 0
    lost: int = 0
    duplicated: int = 0
    tracebacks: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"tries": self.tries, "passed": self.passed, "lost": self.lost, "duplicated": self.duplicated,
                "tracebacks": self.tracebacks}

    def note(self, text: str) -> None:
        self.notes.append(text)


@dataclass
class Lab:
    app_url: str  # SQLAlchemy URL of a migrated application database (emptied by each run)
    cog_server: localstac.CogServer
    stac_api: localstac.StacApiServer
    redis: RedisServer
    workdir: Path

    def settings(self, *, database_url: str | None = None, broker_url: str | None = None,
                 smtp_port: int | None = None) -> Settings:
        """Settings of a chaos run: the loopback COG catalogue, a 6 s lease, SMTP on ``smtp_port``."""
        smtp = SmtpSettings(host="127.0.0.1", port=smtp_port or 9, timeout_seconds=5.0, retry_base_seconds=300.0,
                            outbox_dir=self.workdir / "outbox", sender="UniRS chaos <alerts@chaos.example.org>")
        return Settings(
            database_url=database_url or self.app_url, broker_url=broker_url or self.redis.url,
            catalogues=[loopback_catalogue(self.cog_server.url)], smtp=smtp,
            analysis=AnalysisSettings(lease_seconds=LEASE_SECONDS, heartbeat_seconds=1, max_attempts=3,
                                      queued_resend_seconds=0.0),
        )


@contextlib.contextmanager
def standalone_lab(workdir: Path) -> Iterator[Lab]:
    """Everything a Lab needs, started from nothing (throw-away databases on the shared server's admin
    URL, subprocesses on loopback); all of it stopped and dropped on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    app_dsn = dbadmin.create_scratch_database(ADMIN_URL, "unirs_chaos")
    stac_dsn = dbadmin.with_dbname(ADMIN_URL, f"{dbadmin.dbname(app_dsn)}_stac")
    redis = RedisServer(workdir)
    try:
        app_url = dbadmin.sqlalchemy_url(app_dsn)
        migrate.upgrade(app_url)
        localstac.prepare_database(stac_dsn)
        with localstac.CogServer(localstac.SAMPLE_DATA_DIR, access_log=workdir / "cog-access.jsonl") as cogs:
            localstac.load_sample_data(stac_dsn, cogs.url)
            with localstac.StacApiServer(stac_dsn, asset_base_url=cogs.url) as api:
                redis.start()
                yield Lab(app_url=app_url, cog_server=cogs, stac_api=api, redis=redis, workdir=workdir)
    finally:
        redis.stop()
        reset_engines()
        for dsn in (stac_dsn, app_dsn):
            with contextlib.suppress(psycopg.Error):
                dbadmin.drop_database(dsn)


def truncate_app(url: str) -> None:
    """Empty every application table (a run starts from nothing, like the ``db`` fixture)."""
    from tests.fixtures_workers import truncate

    truncate(url)


# --- a private PostgreSQL cluster ---------------------------------------------------------------------


def _pg_bindir() -> Path:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(out) / "initdb").exists():
            return Path(out)
    except (OSError, subprocess.CalledProcessError):
        pass
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("initdb not found (install postgresql): R2 needs a private cluster")
    return found[-1].parent


class PrivatePostgres:
    """A PostgreSQL cluster of our own on 127.0.0.1:``port`` (superuser ``unirs``, trust auth).

    As root the server runs as the ``postgres`` account (PostgreSQL refuses root); the data directory is
    created for it outside pytest's private tmp tree. :meth:`stop` takes a shutdown mode: ``fast``
    (SIGINT: sessions ended, clean checkpoint) or ``immediate`` (SIGQUIT: no checkpoint, crash recovery at
    the next start), the nearest a test gets to the server vanishing."""

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.port = localstac.free_port()
        self.datadir = Path(tempfile.mkdtemp(prefix="unirs-chaos-pg-"))
        self.proc: subprocess.Popen | None = None
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
            os.chown(self.datadir, self.user.pw_uid, self.user.pw_gid)
        self.log_path = self.datadir.with_suffix(".log")

    def _as_owner(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://unirs@127.0.0.1:{self.port}/postgres"

    def init(self) -> PrivatePostgres:
        subprocess.run([str(self.bindir / "initdb"), "-D", str(self.datadir / "data"), "-U", "unirs", "-A", "trust",
                        "-E", "UTF8", "--locale=C", "--no-sync"], check=True, capture_output=True, cwd="/",
                       **self._as_owner())
        return self

    def start(self, timeout: float = 60.0) -> None:
        from tests.fixtures_workers import _pdeathsig

        cmd = [str(self.bindir / "postgres"), "-D", str(self.datadir / "data"), "-p", str(self.port),
               "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.datadir}",
               # fsync off is safe against a killed server (the OS keeps the written pages), not against a
               # machine crash; synchronous_commit stays on: an immediate shutdown must lose no commit.
               "-c", "fsync=off", "-c", "max_connections=100"]
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                         preexec_fn=_pdeathsig, **self._as_owner())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"private postgres exited {self.proc.returncode}: {self.log_tail()}")
            try:
                with psycopg.connect(self.admin_dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                time.sleep(0.2)
        raise RuntimeError(f"private postgres not ready on {self.port}: {self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal({"fast": signal.SIGINT, "immediate": signal.SIGQUIT, "smart": signal.SIGTERM}[mode])
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def create_app_database(self) -> str:
        """A migrated application database in this cluster; returns its SQLAlchemy URL."""
        url = dbadmin.sqlalchemy_url(dbadmin.create_scratch_database(self.admin_dsn, "unirs_chaos"))
        migrate.upgrade(url)
        return url

    def __enter__(self) -> PrivatePostgres:
        self.init().start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop("fast")
        shutil.rmtree(self.datadir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)
