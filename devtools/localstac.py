"""A real, local STAC API (stac-fastapi-pgstac on pgstac) and a COG HTTP server, for tests and the demo.

Production reads a third-party STAC API with pystac-client and COGs over HTTP through GDAL's /vsicurl/.
This module recreates both on loopback with the same software a public catalogue runs, so tests
exercise the real paths (paging, ``query``, numeric sorting, POST ``next`` links, Range reads):

- :func:`prepare_database` creates a dedicated database, installs pgstac with pypgstac's migrations,
  turns on ``context`` (so searches return ``numberMatched``) and registers typed queryables (without
  them pgstac compares ``eo:cloud_cover`` as text: ``"100.0" < "5"``).
- :func:`load_collection` / :func:`load_items` load with pypgstac's Loader; :func:`rewrite_asset_hrefs`
  turns the sample data's relative asset hrefs into URLs of a :class:`CogServer`.
- :class:`StacApiServer` runs ``uvicorn stac_fastapi.pgstac.app:create_app --factory`` as a subprocess
  on 127.0.0.1 with the transactions extension, so :meth:`StacApiServer.publish_item` can add scenes
  while the service runs.
- :class:`CogServer` serves a directory with HTTP Range support (Starlette ``StaticFiles`` answers
  ``206``) in a subprocess and counts requests and body bytes (``GET /_stats``, JSON lines access log).

Everything binds 127.0.0.1 only. Subprocesses run in their own process group, are stopped on
``stop()``/context exit/interpreter exit, and also exit by themselves when their parent dies.

CLI: ``python -m devtools.localstac --help`` (``prepare``, ``load``, ``serve-cogs``, ``serve-api``, ``demo``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import fcntl
import json
import logging
import os
import posixpath
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Self

from devtools.dbadmin import create_database

log = logging.getLogger(__name__)

#: Committed sample data (see data/sentinel2-romania/README.md).
SAMPLE_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "sentinel2-romania"
#: The database a local demo uses; tests create throw-away databases instead.
DEFAULT_DSN = "postgresql://unirs:unirs@127.0.0.1:5432/unirs_stac"
LOOPBACK = "127.0.0.1"

#: Queryables registered for every collection. The JSON-schema type decides pgstac's cast
#: (number -> to_float, integer -> to_int, date-time -> to_tstz), which makes ``query``/``filter``
#: comparisons and ``sortby`` numeric/temporal instead of textual.
QUERYABLES: dict[str, dict[str, Any]] = {
    "eo:cloud_cover": {"title": "Cloud cover (%)", "type": "number", "minimum": 0, "maximum": 100},
    "grid:code": {"title": "Grid code (MGRS-<tile>)", "type": "string"},
    "s2:processing_baseline": {"title": "Sentinel-2 processing baseline", "type": "string"},
    "s2:sequence": {"title": "Earth Search sequence number", "type": "string"},
    "platform": {"title": "Platform", "type": "string"},
    "mgrs:utm_zone": {"title": "MGRS UTM zone", "type": "integer"},
    "created": {"title": "Created", "type": "string", "format": "date-time"},
    "updated": {"title": "Updated", "type": "string", "format": "date-time"},
}
#: Queryables that also get an index (a cheap one; the poller filters on it on every search).
INDEXED_QUERYABLES = ["eo:cloud_cover"]


# ---------------------------------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------------------------------


def _conninfo(dsn: str) -> dict[str, str]:
    from psycopg.conninfo import conninfo_to_dict

    return {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}


@contextlib.contextmanager
def _pgstac(dsn: str) -> Iterator[Any]:
    """A connected ``PgstacDB`` whose connection pool is closed afterwards (PgstacDB.disconnect returns
    the connection to its pool but leaves the pool, its threads and the idle connection open)."""
    from pypgstac.db import PgstacDB

    db = PgstacDB(dsn=dsn)
    db.connect()
    pool = db.pool
    try:
        yield db
    finally:
        db.disconnect()
        if pool is not None:
            pool.close()


def set_pgstac_setting(dsn: str, name: str, value: str) -> None:
    """Set a pgstac runtime setting in ``pgstac.pgstac_settings`` (read by every search)."""
    with _pgstac(dsn) as db:
        db.connect().execute(
            "INSERT INTO pgstac.pgstac_settings (name, value) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            (name, value),
        )


def register_queryables(
    dsn: str,
    queryables: dict[str, dict[str, Any]] | None = None,
    collection_ids: list[str] | None = None,
    index_fields: list[str] | None = None,
) -> int:
    """Register typed queryables (pgstac ``upsert_queryables``); None collection_ids = every collection.

    Returns how many properties were registered.
    """
    document = {"type": "object", "properties": queryables or QUERYABLES}
    fields = INDEXED_QUERYABLES if index_fields is None else index_fields
    with _pgstac(dsn) as db:
        row = db.connect().execute(
            "SELECT pgstac.upsert_queryables(%s::jsonb, %s::text[], %s::text[], false)",
            (json.dumps(document), collection_ids, fields),
        ).fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def _cluster_migration_lock(dsn: str) -> Iterator[None]:
    info = _conninfo(dsn)
    key = f"{info.get('host') or 'socket'}-{info.get('port') or 5432}"
    path = os.path.join(tempfile.gettempdir(), f"unirs-pgstac-migrate-{key}.lock")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_database(dsn: str = DEFAULT_DSN, create: bool = True) -> str:
    """Make ``dsn`` a ready pgstac database; return the pgstac version. Idempotent.

    Creates the database if missing (the role needs CREATEDB; ``migrate`` itself needs a superuser the
    first time, to create the postgis/btree_gist/unaccent extensions and pgstac roles), runs pypgstac's
    migrations, turns ``context`` on (``numberMatched`` in search results) with no count caching, and
    registers :data:`QUERYABLES`.
    """
    from pypgstac.migrate import Migrate

    if create:
        create_database(dsn)
    # pgstac's migrations create and grant cluster-wide roles (pgstac_admin, pgstac_read, …): two
    # processes migrating two databases of one cluster at once fail with "tuple concurrently updated".
    # Databases are per test run, the cluster is shared, so serialise across processes on this machine.
    with _cluster_migration_lock(dsn), _pgstac(dsn) as db:
        version = Migrate(db).run_migration()
    set_pgstac_setting(dsn, "context", "on")
    # pgstac caches each search's count for context_stats_ttl (default 1 day): numberMatched would stay
    # stale after publish_item. Exact counts are cheap at this size, so never cache them here.
    set_pgstac_setting(dsn, "context_stats_ttl", "0 seconds")
    register_queryables(dsn)
    log.info("pgstac %s ready in %s", version, _conninfo(dsn).get("dbname"))
    return version


def load_collection(dsn: str, collection: dict[str, Any], method: str = "upsert") -> None:
    """Load one Collection dict with pypgstac's Loader (``method``: insert, ignore, upsert)."""
    from pypgstac.load import Loader, Methods

    with _pgstac(dsn) as db:
        Loader(db).load_collections(iter([_strip_relative_links(collection)]), insert_mode=Methods(method))


def load_items(
    dsn: str,
    items: Iterable[dict[str, Any]],
    method: str = "upsert",
    asset_base_url: str | None = None,
    item_dir: str = "items",
) -> int:
    """Load Item dicts with pypgstac's Loader; return how many.

    ``method``: insert (fails on duplicate ids), ignore/insert_ignore, upsert, delsert. With
    ``asset_base_url``, relative asset hrefs are rewritten first (see :func:`rewrite_asset_hrefs`).
    The collection must already be loaded.
    """
    from pypgstac.load import Loader, Methods

    prepared = [rewrite_asset_hrefs(it, asset_base_url, item_dir) if asset_base_url
                else _strip_relative_links(it) for it in items]
    if not prepared:
        return 0
    with _pgstac(dsn) as db:
        Loader(db).load_items(iter(prepared), insert_mode=Methods(method))
    return len(prepared)


# ---------------------------------------------------------------------------------------------------
# Sample data and href rewriting
# ---------------------------------------------------------------------------------------------------


def _is_relative(href: str) -> bool:
    parts = urllib.parse.urlsplit(href)
    return not parts.scheme and not parts.netloc and not href.startswith("/")


def _strip_relative_links(obj: dict[str, Any]) -> dict[str, Any]:
    """Copy without relative links: on disk they point at sibling files, in an API they would dangle
    (the API adds its own self/parent/collection/root links)."""
    out = copy.deepcopy(obj)
    out["links"] = [link for link in out.get("links", []) if not _is_relative(link.get("href", ""))]
    return out


def rewrite_asset_hrefs(item: dict[str, Any], asset_base_url: str, item_dir: str = "items") -> dict[str, Any]:
    """Return a copy of ``item`` whose relative asset hrefs become ``asset_base_url/<path in data dir>``.

    The sample items live in ``<data dir>/items/`` (and ``fixtures/``, same depth) with hrefs like
    ``../cogs/2020-08-29/red.tif``; a :class:`CogServer` serving ``<data dir>`` has that file at
    ``<url>/cogs/2020-08-29/red.tif``. Absolute hrefs are left alone, and so are relative hrefs that
    would leave the data directory (e.g. the hostile fixture's ``../../../etc/shadow``): this function
    never turns a path outside the served tree into a URL. Relative links are dropped.
    """
    out = _strip_relative_links(item)
    base = asset_base_url.rstrip("/")
    for asset in out.get("assets", {}).values():
        href = asset.get("href")
        if not isinstance(href, str) or not _is_relative(href):
            continue
        path = posixpath.normpath(posixpath.join(item_dir, href))
        if path == ".." or path.startswith("../") or path.startswith("/"):
            continue
        asset["href"] = f"{base}/{urllib.parse.quote(path)}"
    return out


def read_sample_collection(data_dir: Path = SAMPLE_DATA_DIR) -> dict[str, Any]:
    """The sample Collection dict (``collection.json``)."""
    return json.loads((Path(data_dir) / "collection.json").read_text(encoding="utf-8"))


def read_sample_items(data_dir: Path = SAMPLE_DATA_DIR, subdir: str = "items") -> list[dict[str, Any]]:
    """Item dicts of ``<data_dir>/<subdir>/*.json`` sorted by id (``subdir="fixtures"`` for the bad ones;
    ``manifest.json`` is skipped)."""
    files = sorted(p for p in (Path(data_dir) / subdir).glob("*.json") if p.name != "manifest.json")
    return [json.loads(p.read_text(encoding="utf-8")) for p in files]


# ---------------------------------------------------------------------------------------------------
# Subprocess plumbing
# ---------------------------------------------------------------------------------------------------

# Loopback requests must never go through a proxy configured in the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the server may still lose a race: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """Minimal JSON HTTP call without proxies; returns (status, decoded body or text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with _NO_PROXY_OPENER.open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


class _Subprocess:
    """A server subprocess on 127.0.0.1: free port, readiness probe, log file, process-group stop."""

    name = "server"
    ready_path = "/"

    def __init__(self, port: int | None = None, log_path: Path | None = None, startup_timeout: float = 60.0):
        self.host = LOOPBACK
        self.port = port
        self.startup_timeout = startup_timeout
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} is not started")
        return f"http://{self.host}:{self.port}"

    # subclasses
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> Self:
        """Start the subprocess and wait until it answers; retries on a lost port race."""
        if self.proc is not None:
            return self
        fixed_port = self.port
        last_error = ""
        for _attempt in range(3):
            self.port = fixed_port or free_port()
            self._spawn()
            ok, last_error = self._wait_ready()
            if ok:
                atexit.register(self.stop)
                log.info("%s listening on %s (pid %s)", self.name, self.url, self.proc.pid)
                return self
            tail = self.log_tail()  # read before stop() removes a private log
            last_error += "\n--- log tail ---\n" + tail
            self.stop()
            if fixed_port or "address already in use" not in tail.lower():
                break  # only a lost race for a free port is worth another try
        raise RuntimeError(f"{self.name} did not start: {last_error}")

    def _spawn(self) -> None:
        # A private working directory: stac-fastapi's settings read a ".env" from the cwd.
        self._workdir = tempfile.TemporaryDirectory(prefix=f"unirs-{self.name}-")
        if self._own_log:
            self.log_path = Path(self._workdir.name) / f"{self.name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.command(), cwd=self._workdir.name, env=self.environment(), stdin=subprocess.DEVNULL,
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def _wait_ready(self) -> tuple[bool, str]:
        deadline = time.monotonic() + self.startup_timeout
        error = "timeout"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False, f"exited with code {self.proc.returncode}"
            try:
                status, _ = http_json("GET", self.url + self.ready_path, timeout=2)
                if status == 200:
                    return True, ""
                error = f"HTTP {status}"
            except OSError as exc:
                error = str(exc)
            time.sleep(0.2)
        return False, error

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the subprocess (SIGTERM to its own process group, then SIGKILL). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # our own group: start_new_session=True
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
            except ProcessLookupError:
                pass
        atexit.unregister(self.stop)
        if self._workdir is not None:
            self._workdir.cleanup()  # holds the log too unless the caller chose log_path
            self._workdir = None
            if self._own_log:
                self.log_path = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _module_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "devtools.localstac", *args, "--parent-pid", str(os.getpid())]


def _module_env() -> dict[str, str]:
    # The subprocess imports devtools.localstac: make the package importable from its private cwd.
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _exit_when_parent_dies(parent_pid: int | None) -> None:
    """Background watchdog: SIGTERM ourselves (graceful uvicorn shutdown) once the parent is gone, so
    a test run killed with SIGKILL leaves no server behind."""
    if not parent_pid:
        return

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


# ---------------------------------------------------------------------------------------------------
# STAC API
# ---------------------------------------------------------------------------------------------------


class StacApiServer(_Subprocess):
    """stac-fastapi-pgstac under uvicorn in a subprocess on 127.0.0.1, transactions enabled.

    >>> with StacApiServer(dsn) as api:
    ...     Client.open(api.url).search(collections=["sentinel-2-l2a"], max_items=5)
    """

    name = "stac-api"
    ready_path = "/_mgmt/ping"

    def __init__(self, dsn: str = DEFAULT_DSN, port: int | None = None, log_path: Path | None = None,
                 startup_timeout: float = 60.0, asset_base_url: str | None = None,
                 extra_env: dict[str, str] | None = None):
        super().__init__(port, log_path, startup_timeout)
        self.dsn = dsn
        #: Default base URL for relative asset hrefs of items given to :meth:`publish_item`.
        self.asset_base_url = asset_base_url
        self.extra_env = dict(extra_env or {})

    def command(self) -> list[str]:
        return _module_command("_run-stac-api", "--port", str(self.port))

    def environment(self) -> dict[str, str]:
        info = _conninfo(self.dsn)
        env = _module_env()
        env.update({
            "PGHOST": info.get("host", LOOPBACK),
            "PGPORT": info.get("port", "5432"),
            "PGUSER": info.get("user", os.environ.get("PGUSER", "unirs")),
            "PGPASSWORD": info.get("password", os.environ.get("PGPASSWORD", "")),
            "PGDATABASE": info["dbname"],
            "ENABLE_TRANSACTIONS_EXTENSIONS": "true",
            # Two shared cores: a small pool is plenty for tests and the demo.
            "DB_MIN_CONN_SIZE": "1",
            "DB_MAX_CONN_SIZE": "4",
        })
        env.update(self.extra_env)
        return env

    def publish_item(self, item: dict[str, Any], collection_id: str | None = None, upsert: bool = False,
                     asset_base_url: str | None = None) -> dict[str, Any]:
        """Publish ``item`` through the transactions endpoint (POST /collections/{id}/items).

        Relative asset hrefs are rewritten with ``asset_base_url`` (default: the server's). With
        ``upsert``, an existing id is replaced (PUT). Returns the item as the API stored it.
        """
        base = asset_base_url or self.asset_base_url
        body = rewrite_asset_hrefs(item, base) if base else _strip_relative_links(item)
        cid = collection_id or body.get("collection")
        if not cid:
            raise ValueError("item has no collection; pass collection_id")
        body["collection"] = cid
        url = f"{self.url}/collections/{urllib.parse.quote(cid)}/items"
        status, result = http_json("POST", url, body)
        if status == 409 and upsert:
            status, result = http_json("PUT", f"{url}/{urllib.parse.quote(body['id'])}", body)
        if status not in (200, 201):
            raise RuntimeError(f"publishing {body.get('id')} failed: HTTP {status}: {result}")
        return result

    def delete_item(self, item_id: str, collection_id: str) -> None:
        """Delete an item through the transactions endpoint (tests undo their publications)."""
        url = f"{self.url}/collections/{urllib.parse.quote(collection_id)}/items/{urllib.parse.quote(item_id)}"
        status, result = http_json("DELETE", url)
        if status not in (200, 204):
            raise RuntimeError(f"deleting {item_id} failed: HTTP {status}: {result}")


def _run_stac_api(port: int, parent_pid: int | None) -> None:
    """Subprocess entry: ``uvicorn stac_fastapi.pgstac.app:create_app --factory --host 127.0.0.1``."""
    import uvicorn

    _exit_when_parent_dies(parent_pid)
    uvicorn.run("stac_fastapi.pgstac.app:create_app", factory=True, host=LOOPBACK, port=port,
                log_level="info", access_log=False)


# ---------------------------------------------------------------------------------------------------
# COG server
# ---------------------------------------------------------------------------------------------------


class _Counters:
    """Requests and body bytes served, in total and per path (the benchmark compares these with the
    bytes of the tiles a read needed)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.range_requests = 0
            self.bytes_sent = 0
            self.status: dict[str, int] = {}
            self.paths: dict[str, dict[str, int]] = {}

    def add(self, path: str, status: int, sent: int, ranged: bool) -> None:
        with self.lock:
            self.requests += 1
            self.range_requests += int(ranged)
            self.bytes_sent += sent
            self.status[str(status)] = self.status.get(str(status), 0) + 1
            entry = self.paths.setdefault(path, {"requests": 0, "bytes": 0})
            entry["requests"] += 1
            entry["bytes"] += sent

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": self.requests, "range_requests": self.range_requests,
                    "bytes_sent": self.bytes_sent, "status": dict(self.status),
                    "paths": {k: dict(v) for k, v in self.paths.items()}}


def make_cog_app(root: Path, access_log: Path | None = None):
    """ASGI app: ``StaticFiles(root)`` (Range -> 206) wrapped in a byte counter.

    ``GET /_stats`` returns the counters as JSON, ``POST /_stats/reset`` zeroes them; neither is
    counted. With ``access_log``, one JSON line per request: method, path, range, status, bytes.
    """
    from starlette.exceptions import HTTPException
    from starlette.responses import PlainTextResponse
    from starlette.staticfiles import StaticFiles

    files = StaticFiles(directory=str(root), follow_symlink=False)
    counters = _Counters()
    log_file = open(access_log, "a", buffering=1, encoding="utf-8") if access_log else None

    async def send_json(send, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return await files(scope, receive, send)
        path = scope["path"]
        if path == "/_stats":
            return await send_json(send, 200, counters.snapshot())
        if path == "/_stats/reset" and scope["method"] == "POST":
            counters.reset()
            return await send_json(send, 200, {"reset": True})

        headers = dict(scope.get("headers") or [])
        range_header = headers.get(b"range", b"").decode("latin-1") or None
        state = {"status": 0, "sent": 0, "recorded": False}

        def record() -> None:
            if state["recorded"]:
                return
            state["recorded"] = True
            counters.add(path, state["status"], state["sent"], range_header is not None)
            if log_file is not None:
                log_file.write(json.dumps({"t": round(time.time(), 3), "method": scope["method"], "path": path,
                                           "range": range_header, "status": state["status"],
                                           "bytes": state["sent"]}) + "\n")

        async def counting_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                state["sent"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    record()  # before the last byte leaves: a client that reads /_stats next sees it
            await send(message)

        try:
            await files(scope, receive, counting_send)
        except HTTPException as exc:
            # StaticFiles signals 404/405 by raising; outside a Starlette app nothing turns that into a
            # response, so do it here (otherwise uvicorn answers 500).
            await PlainTextResponse(exc.detail, status_code=exc.status_code)(scope, receive, counting_send)
        finally:
            record()

    app.counters = counters  # for in-process use
    return app


class CogServer(_Subprocess):
    """Serve ``root`` (e.g. the sample data directory) over HTTP with Range support, in a subprocess.

    ``url + "/cogs/2020-08-29/red.tif"`` is what GDAL reads through /vsicurl/. :meth:`stats` returns
    the request/byte counters, :meth:`reset_stats` zeroes them; ``access_log`` (JSON lines) records
    every request with its Range header.
    """

    name = "cog-server"
    ready_path = "/_stats"

    def __init__(self, root: Path = SAMPLE_DATA_DIR, port: int | None = None, log_path: Path | None = None,
                 access_log: Path | None = None, startup_timeout: float = 30.0):
        super().__init__(port, log_path, startup_timeout)
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(self.root)
        self.access_log = Path(access_log) if access_log else None

    def command(self) -> list[str]:
        cmd = _module_command("serve-cogs", "--root", str(self.root), "--port", str(self.port))
        if self.access_log:
            cmd += ["--access-log", str(self.access_log)]
        return cmd

    def environment(self) -> dict[str, str]:
        return _module_env()

    def href(self, relative_path: str) -> str:
        """URL of a file below ``root`` (``"cogs/2020-08-29/red.tif"``)."""
        return f"{self.url}/{urllib.parse.quote(relative_path.lstrip('/'))}"

    def stats(self) -> dict[str, Any]:
        """Counters: requests, range_requests, bytes_sent, status counts, per-path requests/bytes."""
        status, body = http_json("GET", self.url + "/_stats")
        if status != 200:
            raise RuntimeError(f"/_stats answered HTTP {status}")
        return body

    def reset_stats(self) -> None:
        http_json("POST", self.url + "/_stats/reset")


def serve_cogs(root: Path, port: int, access_log: Path | None = None, parent_pid: int | None = None) -> None:
    """Run the COG server in the foreground on 127.0.0.1:port (the subprocess entry point)."""
    import uvicorn

    _exit_when_parent_dies(parent_pid)
    uvicorn.run(make_cog_app(Path(root), access_log), host=LOOPBACK, port=port, log_level="warning",
                access_log=False)


def read_access_log(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a :class:`CogServer` JSON-lines access log (for benchmarks)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


#: GDAL settings for reading COGs over HTTP as production does (architecture.md, "Rules").
GDAL_HTTP_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "VSI_CACHE": "TRUE",
}


# ---------------------------------------------------------------------------------------------------
# Demo / CLI
# ---------------------------------------------------------------------------------------------------


def load_sample_data(dsn: str, asset_base_url: str, data_dir: Path = SAMPLE_DATA_DIR,
                     method: str = "upsert") -> int:
    """Load the sample Collection and its Items (not the fixtures); return the number of items."""
    load_collection(dsn, read_sample_collection(data_dir), method=method)
    return load_items(dsn, read_sample_items(data_dir), method=method, asset_base_url=asset_base_url)


def _wait_forever(servers: list[_Subprocess]) -> None:
    """Block until Ctrl-C or SIGTERM (or a server dies), then stop every server."""

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while all(s.proc is not None and s.proc.poll() is None for s in servers):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for s in servers:
            s.stop()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m devtools.localstac",
        description="Local STAC API (stac-fastapi-pgstac + pgstac) and COG server on 127.0.0.1.")
    # The metavar hides the internal "_run-stac-api" command from the help.
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{prepare,load,serve-cogs,serve-api,demo}")

    s = sub.add_parser("prepare", help="create the database if missing, migrate pgstac, settings, queryables")
    s.add_argument("--dsn", default=DEFAULT_DSN)

    s = sub.add_parser("load", help="load the sample collection + items (relative hrefs -> --asset-base-url)")
    s.add_argument("--dsn", default=DEFAULT_DSN)
    s.add_argument("--data-dir", type=Path, default=SAMPLE_DATA_DIR)
    s.add_argument("--asset-base-url", required=True, help="URL where --data-dir is served (see serve-cogs)")
    s.add_argument("--method", default="upsert", choices=["insert", "ignore", "upsert", "delsert"])

    s = sub.add_parser("serve-cogs", help="serve a directory over HTTP with Range support (foreground)")
    s.add_argument("--root", type=Path, default=SAMPLE_DATA_DIR)
    s.add_argument("--port", type=int, default=8083)
    s.add_argument("--access-log", type=Path, default=None)
    s.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)

    s = sub.add_parser("serve-api", help="run stac-fastapi-pgstac on 127.0.0.1 (foreground)")
    s.add_argument("--dsn", default=DEFAULT_DSN)
    s.add_argument("--port", type=int, default=8082)

    s = sub.add_parser("demo", help="prepare + load the sample data + serve COGs and the STAC API until Ctrl-C")
    s.add_argument("--dsn", default=DEFAULT_DSN)
    s.add_argument("--data-dir", type=Path, default=SAMPLE_DATA_DIR)
    s.add_argument("--api-port", type=int, default=8082)
    s.add_argument("--cog-port", type=int, default=8083)

    # Internal: the StacApiServer subprocess (uvicorn + parent watchdog).
    s = sub.add_parser("_run-stac-api")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--parent-pid", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "prepare":
        print(prepare_database(args.dsn))
    elif args.cmd == "load":
        n = load_sample_data(args.dsn, args.asset_base_url, args.data_dir, args.method)
        print(f"loaded {n} items")
    elif args.cmd == "serve-cogs":
        serve_cogs(args.root, args.port, args.access_log, args.parent_pid)
    elif args.cmd == "_run-stac-api":
        _run_stac_api(args.port, args.parent_pid)
    elif args.cmd == "serve-api":
        _wait_forever([StacApiServer(args.dsn, port=args.port).start()])
    elif args.cmd == "demo":
        prepare_database(args.dsn)
        cogs = CogServer(args.data_dir, port=args.cog_port).start()
        n = load_sample_data(args.dsn, cogs.url, args.data_dir)
        api = StacApiServer(args.dsn, port=args.api_port, asset_base_url=cogs.url).start()
        print(f"STAC API {api.url}  ({n} items)   COGs {cogs.url}   Ctrl-C stops", flush=True)
        _wait_forever([api, cogs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
