"""A private ``redis-server`` on a free loopback port, for the demo, the tests and the benchmarks.

The machine's shared Redis (127.0.0.1:6379) may have other consumers of the ``cpu`` queue — another demo, a
test suite, a benchmark — which would take this run's tasks and find "nothing due" in their own databases.
No persistence (``--save ''``, no AOF): a restart really loses every message, as the chaos tests need.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from devtools import localstac


def pdeathsig() -> None:
    """``preexec_fn``: the child gets SIGKILL when its parent dies (even when the parent is killed)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class RedisServer:
    """``redis-server`` bound to 127.0.0.1 on a free port, working in ``workdir``; ``url`` is its db 0.

    Raises RuntimeError from :meth:`start` when the binary is missing or the server does not answer PING
    within 20 s."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = localstac.free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/setup-services installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
               "--dir", str(self.workdir), "--protected-mode", "yes"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, preexec_fn=pdeathsig)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._ping():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def _ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port: every message held by the broker is gone."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
