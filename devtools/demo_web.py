"""The web app over the demo's database, left running when ``scripts/demo`` ends.

``start_web`` creates the demo login (``demo@example.org``, a fresh random password each run), makes it
the owner of every area of the database (the demo's one area, added through the operator CLI), and
starts ``unirs-monitor serve`` on 127.0.0.1 as its own session, so it outlives the demo command. Its PID
goes to ``<var>/web.pid``; the next demo run stops it first (``stop_previous``) before dropping the
database under it.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update

from core.db import session_scope
from core.models import Analysis, AnalysisStatus, Area, Finding
from monitor import accounts

DEMO_EMAIL = "demo@example.org"
PIDFILE = "web.pid"
LOGINFILE = "web-login.txt"
STARTUP_SECONDS = 60.0


@dataclass
class DemoWeb:
    url: str
    pid: int
    email: str
    password: str
    area_url: str | None  # the demo area's page
    analysis_url: str | None  # its latest done analysis with findings


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(preferred: int) -> int:
    """``preferred`` when nothing listens on it, else any free loopback port."""
    if preferred and _free(preferred):
        return preferred
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_previous(var_dir: Path) -> int | None:
    """Stop the server an earlier demo run left (its PID file), only if that PID still runs ``serve``
    from this checkout — a reused PID of something else is left alone. Returns the PID stopped."""
    pidfile = var_dir / PIDFILE
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if b"serve" not in cmdline or not any(arg.endswith(b"monitor.cli") for arg in cmdline):
        return None
    # uvicorn drains its connections on SIGTERM; on a loaded machine that can outlast the grace period,
    # and a server left running would keep the port and the PID file's promise broken.
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _running(pid):
            break
    pidfile.unlink(missing_ok=True)
    return pid


def _running(pid: int) -> bool:
    """Alive and not a zombie; reaps it when it is this process's own child (the tests start it).

    The state is read before reaping: reaping first and reading after leaves a child that exits in
    between as an unreaped zombie (its /proc entry stays until this process exits). A multi-threaded
    server's leader shows ``Z`` while its other threads are still exiting, and ``waitpid`` cannot reap
    it yet (it returns 0): that child is still running, or the caller would leave it unreaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        state = "gone"
    if state in ("Z", "X", "gone"):
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return False  # not this process's child (its own parent reaps it) or reaped already
        return reaped == 0
    return True


def _demo_account(app_url: str) -> tuple[str, int | None, int | None]:
    """(password, area id, analysis id): the demo login owns the areas; the latest analysis with findings."""
    password = secrets.token_urlsafe(12)
    with session_scope(app_url) as session:
        user = accounts.get_user(session, DEMO_EMAIL) or accounts.create_user(session, DEMO_EMAIL, name="Demo")
        user.password_hash = accounts.hash_password(password)
        session.flush()
        session.execute(update(Area).values(owner_id=user.id))
        area_id = session.scalar(select(Area.id).order_by(Area.id).limit(1))
        analysis_id = session.scalar(
            select(Analysis.id).where(Analysis.status == AnalysisStatus.DONE,
                                      Analysis.id.in_(select(Finding.analysis_id).where(Finding.kind == "region")))
            .order_by(Analysis.id.desc()).limit(1))
    return password, area_id, analysis_id


def start_web(app_url: str, var_dir: Path, *, port: int = 8080, cwd: Path | None = None) -> DemoWeb:
    """Start ``unirs-monitor serve`` over ``app_url`` on 127.0.0.1 (``port``, or a free one when taken) and
    wait for /healthz. Raises RuntimeError with the log's tail when it does not come up."""
    password, area_id, analysis_id = _demo_account(app_url)
    port = pick_port(port)
    url = f"http://127.0.0.1:{port}"
    # No basemap, whatever the caller's environment or config file says: the demo is offline, and the
    # browser opening it asks no host but 127.0.0.1.
    env = {**os.environ, "UNIRS_DATABASE_URL": app_url, "UNIRS_WEB__PUBLIC_URL": url,
           "UNIRS_WEB__SECRET": secrets.token_urlsafe(32), "UNIRS_LOG_LEVEL": "WARNING",
           "UNIRS_WEB__BASEMAP_URL": "", "UNIRS_WEB__BASEMAP_ATTRIBUTION": ""}
    var_dir.mkdir(parents=True, exist_ok=True)
    log = var_dir / "web.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "serve", "--host", "127.0.0.1", "--port",
                                 str(port)], env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"unirs-monitor serve exited with {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            with opener.open(f"{url}/healthz", timeout=5) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)
            raise RuntimeError(f"unirs-monitor serve did not answer {url}/healthz: {log.read_text()[-1500:]}")
        time.sleep(0.2)
    (var_dir / PIDFILE).write_text(f"{proc.pid}\n")
    (var_dir / LOGINFILE).write_text(f"{url}/login\n{DEMO_EMAIL}\n{password}\n")
    os.chmod(var_dir / LOGINFILE, 0o600)
    return DemoWeb(url, proc.pid, DEMO_EMAIL, password,
                   f"{url}/areas/{area_id}" if area_id else None,
                   f"{url}/analyses/{analysis_id}" if analysis_id else None)
