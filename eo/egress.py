"""Every connection GDAL makes for an asset read passes the href policy, redirects included.

GDAL (libcurl) follows HTTP redirects and GDAL 3.10 has no option to stop it (``GDAL_HTTP_FOLLOWLOCATION``
is not a GDAL configuration option; libcurl's ``CURLOPT_FOLLOWLOCATION`` is always on in ``/vsicurl/``).
A URL checked by :func:`eo.security.check_href` could therefore answer ``302 Location:`` anything. So asset
reads go through a small forward proxy on loopback, started once per process, that GDAL is pointed at with
``GDAL_HTTP_PROXY`` / ``GDAL_HTTPS_PROXY``. libcurl sends every request — each redirect hop too — to that
proxy, which:

- checks the target with :func:`eo.security.check_href` (``https://host:port/`` for a ``CONNECT`` tunnel,
  the absolute URL for plain ``http``) against the policy of the catalogue the read is for;
- resolves the host itself, refuses non-public addresses (unless the catalogue opts in) and connects to
  the very address it checked, which also closes the DNS-rebinding window of checking first and letting
  libcurl resolve again;
- answers ``403`` to anything refused and records why, so :func:`eo.cog.read_aoi` raises
  :class:`eo.security.HrefRefused` naming the hop instead of a bare GDAL error.

A read is tied to its catalogue by proxy credentials (``GDAL_HTTP_PROXYUSERPWD`` = a random token per
read, sent as ``Proxy-Authorization: Basic``); requests without a live token get ``407``, so the proxy is
not an open relay for other local users. libcurl skips a proxy for hosts named in ``no_proxy`` /
``NO_PROXY``, so :func:`guard` removes those variables from the process environment (with a warning).
``file://`` redirects are refused by libcurl itself (not among its redirect protocols).

HTTPS stays end-to-end (``CONNECT`` is a byte tunnel); plain ``http`` requests are forwarded one per
connection (``Connection: close`` upstream and in the answer relayed to the client; a second request on the
client's connection ends it rather than reaching the first request's host unvetted). ``s3://`` hrefs do not
use the proxy: GDAL talks to the deployment's configured S3 endpoint, not to a catalogue-chosen host.
"""

from __future__ import annotations

import base64
import collections
import ipaddress
import logging
import os
import secrets
import select
import socket
import socketserver
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from core.config import CatalogueSettings
from eo.security import HrefRefused, check_href, non_public_reason

logger = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 64 * 1024
_IDLE_SECONDS = 120.0
_USER = "unirs"


@dataclass(frozen=True)
class Refusal:
    token: str
    target: str
    reason: str


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # GDAL fetches a window's tile ranges in parallel (one connection each, GDAL_HTTP_MULTIRANGE), several
    # reads at once: with socketserver's default backlog of 5 the kernel drops the surplus SYNs and each
    # such connection waits out the 1 s SYN retransmit (bench_egress: 2x on block reads).
    request_queue_size = 512


class EgressGuard:
    """The per-process policy proxy (use :func:`guard`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reads: dict[str, CatalogueSettings] = {}
        self._refusals: collections.deque[Refusal] = collections.deque(maxlen=1000)
        guard_self = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                guard_self._handle(self.request)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="unirs-egress", daemon=True)
        self._thread.start()

    # --- reads ------------------------------------------------------------------------------------

    def open_read(self, catalogue: CatalogueSettings) -> str:
        token = secrets.token_urlsafe(18)
        with self._lock:
            self._reads[token] = catalogue
        return token

    def close_read(self, token: str) -> None:
        with self._lock:
            self._reads.pop(token, None)

    def gdal_options(self, token: str) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{self.port}"
        return {"GDAL_HTTP_PROXY": proxy, "GDAL_HTTPS_PROXY": proxy, "GDAL_HTTP_PROXYUSERPWD": f"{_USER}:{token}"}

    def refusals(self, token: str) -> list[Refusal]:
        with self._lock:
            return [r for r in self._refusals if r.token == token]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- the proxy --------------------------------------------------------------------------------

    def _handle(self, client: socket.socket) -> None:
        client.settimeout(_IDLE_SECONDS)
        try:
            head, rest = _read_head(client)
        except (OSError, ValueError):
            return
        try:
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
        except ValueError:
            _answer(client, 400, "bad request line")
            return
        headers = [line for line in header_lines if line]
        token = _token(headers)
        with self._lock:
            catalogue = self._reads.get(token) if token else None
        if catalogue is None:
            _answer(client, 407, "proxy credentials missing or expired", {"Proxy-Authenticate": 'Basic realm="unirs"'})
            return
        if method.upper() == "CONNECT":
            host, _, port_text = target.rpartition(":")
            url = f"https://{host}:{port_text}/" if port_text not in ("", "443") else f"https://{host}/"
        else:
            url = target
        try:
            address, port = self._vet(url, catalogue)
        except HrefRefused as exc:
            with self._lock:
                self._refusals.append(Refusal(token, url, str(exc)))
            logger.warning("asset read refused a hop: %s", exc)
            _answer(client, 403, "refused by the href policy")
            return
        try:
            upstream = socket.create_connection((address, port), timeout=_IDLE_SECONDS)
        except OSError as exc:
            _answer(client, 502, f"cannot connect: {exc.__class__.__name__}")
            return
        with upstream:
            if method.upper() == "CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
                _pipe(client, upstream)
            else:
                upstream.sendall(_origin_request(method, url, version, headers) + rest)
                _relay_response(client, upstream)

    def _vet(self, url: str, catalogue: CatalogueSettings) -> tuple[str, int]:
        """check_href the hop, then resolve it once and return the vetted address to connect to."""
        check_href(url, catalogue, resolve=False, sign=False)
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            raise HrefRefused(f"href {url!r}: host {host!r} does not resolve ({exc})") from None
        for info in infos:
            address = info[4][0]
            if not catalogue.allow_private_hosts:
                problem = non_public_reason(ipaddress.ip_address(address.split("%", 1)[0]))
                if problem:
                    raise HrefRefused(f"href {url!r}: host {host!r} resolves to {address}, {problem}")
            return address, port
        raise HrefRefused(f"href {url!r}: host {host!r} resolves to no address")


_guard: EgressGuard | None = None
_guard_pid: int | None = None
_guard_lock = threading.Lock()


def guard() -> EgressGuard:
    """The proxy of this process, started on first use (again in a forked child: threads do not fork)."""
    global _guard, _guard_pid
    with _guard_lock:
        if _guard is None or _guard_pid != os.getpid():
            for name in ("no_proxy", "NO_PROXY"):
                if os.environ.pop(name, None) is not None:
                    logger.warning("%s removed from the environment: libcurl would bypass the asset-read "
                                   "policy proxy for the hosts it names", name)
            _guard, _guard_pid = EgressGuard(), os.getpid()
        return _guard


def uses_proxy(url: str) -> bool:
    return urlsplit(url).scheme.lower() in ("http", "https")


# --- plumbing --------------------------------------------------------------------------------------


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(8192)
        if not chunk:
            raise ValueError("connection closed before the request head")
        data += chunk
        if len(data) > _MAX_HEADER_BYTES:
            raise ValueError("request head too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _token(headers: list[str]) -> str | None:
    for line in headers:
        name, _, value = line.partition(":")
        if name.strip().lower() != "proxy-authorization":
            continue
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, token = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return token if user == _USER else None
    return None


_HOP_HEADERS = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}


def _origin_request(method: str, url: str, version: str, headers: list[str]) -> bytes:
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    kept = [line for line in headers if line.partition(":")[0].strip().lower() not in _HOP_HEADERS]
    lines = [f"{method} {path} {version}", *kept, "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _answer(sock: socket.socket, status: int, text: str, extra: dict[str, str] | None = None) -> None:
    reasons = {400: "Bad Request", 403: "Forbidden", 407: "Proxy Authentication Required", 502: "Bad Gateway"}
    body = (text + "\n").encode()
    lines = [f"HTTP/1.1 {status} {reasons.get(status, 'Error')}", "Content-Type: text/plain",
             f"Content-Length: {len(body)}", "Connection: close", *[f"{k}: {v}" for k, v in (extra or {}).items()]]
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    except OSError:
        pass


def _relay_response(client: socket.socket, upstream: socket.socket) -> None:
    """Copy the upstream's answer to the client; end at the client's next request.

    A plain-HTTP proxy connection may be reused by libcurl for a request to ANOTHER host. Piping those
    bytes to this upstream would send an unvetted request to the first host (and hand its answer back as
    the other host's), so a proxied ``http`` connection carries one vetted request; libcurl retries a
    request on a fresh connection when a reused one closes before answering.
    """
    try:
        head, rest = _read_head(upstream)
        client.sendall(_closing_response_head(head) + rest)
    except (OSError, ValueError):
        return
    sockets: list[Any] = [client, upstream]
    while True:
        readable, _, _ = select.select(sockets, [], [], _IDLE_SECONDS)
        if not readable or client in readable:
            return
        try:
            data = upstream.recv(65536)
            if not data:
                return
            client.sendall(data)
        except OSError:
            return


def _closing_response_head(head: bytes) -> bytes:
    """The upstream's response head with ``Connection: close`` (its own hop headers dropped).

    Without it libcurl takes the proxy connection for reusable, sends its next request on it, finds it
    closed (one request per connection, above) and GDAL retries after ``GDAL_HTTP_RETRY_DELAY``: a second
    lost per parallel range read (bench_egress measured it).
    """
    status, *lines = head.decode("latin-1").split("\r\n")
    kept = [line for line in lines if line and line.partition(":")[0].strip().lower() not in _HOP_HEADERS]
    return "\r\n".join([status, *kept, "Connection: close", "Proxy-Connection: close", "", ""]).encode("latin-1")


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes or both are idle for too long."""
    sockets: list[Any] = [a, b]
    while True:
        readable, _, _ = select.select(sockets, [], [], _IDLE_SECONDS)
        if not readable:
            return
        for sock in readable:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                (b if sock is a else a).sendall(data)
            except OSError:
                return
