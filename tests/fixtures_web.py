"""The web app on the session's throw-away database: accounts, tokens and a TestClient (real FastAPI
routing, real PostGIS; no network)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from fastapi.testclient import TestClient

from core.config import Settings
from core.db import session_scope
from core.models import OPERATOR_EMAIL
from monitor import accounts

PASSWORD = "correct horse battery"


@dataclass
class Account:
    id: int
    email: str
    token: str  # read + write
    read_token: str

    def auth(self, read_only: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.read_token if read_only else self.token}"}


def web_settings(database_url: str, **web) -> Settings:
    return Settings(database_url=database_url, web={"secret": "test-secret", "basemap_url": "",
                                                     "public_url": "http://testserver", **web})


@pytest.fixture
def web_db(db: str) -> Iterator[str]:
    """The emptied session database, accounts included (the migration's operator account is kept)."""
    with psycopg.connect(db.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("TRUNCATE api_tokens, login_failures, unsubscribes RESTART IDENTITY CASCADE")
        conn.execute("DELETE FROM users WHERE email <> %s", (OPERATOR_EMAIL,))
    yield db


def make_account(database_url: str, email: str, admin: bool = False) -> Account:
    with session_scope(database_url) as session:
        user = accounts.create_user(session, email, password=PASSWORD, admin=admin)
        token = accounts.issue_token(session, user, "test", ["read", "write"])
        read = accounts.issue_token(session, user, "test-ro", ["read"])
        return Account(user.id, user.email, token, read)


@pytest.fixture
def web_client(web_db: str) -> Iterator[TestClient]:
    from web.app import create_app

    with TestClient(create_app(web_settings(web_db))) as client:
        yield client


@pytest.fixture
def alice(web_db: str) -> Account:
    return make_account(web_db, "alice@example.org")


@pytest.fixture
def bob(web_db: str) -> Account:
    return make_account(web_db, "bob@example.org")


@dataclass
class LiveServer:
    url: str
    database_url: str


@pytest.fixture
def live_server(web_db: str) -> Iterator[LiveServer]:
    """The app under a real uvicorn on 127.0.0.1 (a free port), for clients that speak HTTP themselves
    (GDAL, a browser)."""
    import socket
    import threading
    import time

    import uvicorn

    from web.app import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(web_settings(web_db, public_url=url)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield LiveServer(url, web_db)
    server.should_exit = True
    thread.join()


@dataclass
class ServedApp:
    url: str
    database_url: str
    pid: int


@pytest.fixture
def served_app(web_db: str, tmp_path) -> Iterator[ServedApp]:
    """``unirs-monitor serve`` as its own process on 127.0.0.1 (a free port). Clients that block the GIL
    while they talk HTTP (GDAL's OAPIF driver through pyogrio) deadlock against an in-process server."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "UNIRS_DATABASE_URL": web_db, "UNIRS_WEB__SECRET": "test-secret",
           "UNIRS_WEB__BASEMAP_URL": "", "UNIRS_WEB__PUBLIC_URL": url,
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("UNIRS_LOG_LEVEL", None)  # serve with the default level, as a fresh deployment does
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "serve", "--host", "127.0.0.1", "--port",
                                 str(port)], cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"unirs-monitor serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with opener.open(f"{url}/healthz", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield ServedApp(url, web_db, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
