"""Loopback HTTP servers for redirect tests: a Range-capable file server and a redirector.

Both bind an address inside 127.0.0.0/8 only (127.0.0.2 is the "not allowed" host of these tests).
"""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Server:
    def __init__(self, host: str, handler: type[http.server.BaseHTTPRequestHandler]):
        assert host.startswith("127."), "loopback only"
        self.server = http.server.ThreadingHTTPServer((host, 0), handler)
        self.server.daemon_threads = True
        self.host = host
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server.server_address[1]}"

    def record(self, method: str, path: str) -> None:
        with self.lock:
            self.requests.append((method, path))

    def __enter__(self) -> Any:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class RangeFileServer(_Server):
    """Serves files below ``root`` with HTTP Range support (what GDAL's /vsicurl/ needs).

    ``fail_with``: statuses answered, one per request, before any file is served (an asset not uploaded
    yet, a host refusing for a while); ``failures_left`` can be set again between reads."""

    def __init__(self, root: Path, host: str = "127.0.0.1", fail_with: tuple[int, ...] = ()):
        outer = self
        self.failures_left = list(fail_with)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self, body: bool) -> None:
                outer.record(self.command, self.path)
                with outer.lock:
                    status = outer.failures_left.pop(0) if outer.failures_left else None
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = (root / self.path.split("?", 1)[0].lstrip("/")).resolve()
                if not path.is_file() or root.resolve() not in path.parents:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                match = _RANGE.match(self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    end = min(int(match.group(2) or len(data) - 1), len(data) - 1)
                    chunk = data[start:end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    chunk = data
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                if body:
                    self.wfile.write(chunk)

            def do_GET(self) -> None:
                self._serve(True)

            def do_HEAD(self) -> None:
                self._serve(False)

        super().__init__(host, Handler)


class Redirector(_Server):
    """Answers every request with ``status`` and ``Location: target(path)``."""

    def __init__(self, target: Callable[[str], str], host: str = "127.0.0.1", status: int = 302):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _redirect(self) -> None:
                outer.record(self.command, self.path)
                self.send_response(status)
                self.send_header("Location", target(self.path))
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _redirect

        super().__init__(host, Handler)
