"""Asset reads never leave the href policy, redirects included (real servers on 127.0.0.1 / 127.0.0.2)."""

from __future__ import annotations

import base64
import socket
import threading

import pytest

from eo import egress
from eo.cog import CogReadError, CogSession, read_aoi
from eo.security import HrefRefused
from tests.fixtures_egress import RangeFileServer, Redirector
from tests.fixtures_ingest import inner_aoi
from tests.test_security import LOOPBACK_OPT_IN

RED = "cogs/2020-08-29/red.tif"
ONLY_127_0_0_1 = LOOPBACK_OPT_IN.model_copy(update={"allowed_hosts": ["127.0.0.1"]})


@pytest.fixture
def other_host(sample_data_dir):
    """The sample COGs served on 127.0.0.2, a loopback host that is NOT on the allow-list."""
    with RangeFileServer(sample_data_dir, host="127.0.0.2") as server:
        yield server


def test_the_other_host_really_serves_the_cog(other_host, sample_footprint):
    # Control: with 127.0.0.2 allowed the very same read succeeds, so a refusal below is the policy.
    both = ONLY_127_0_0_1.model_copy(update={"allowed_hosts": ["127.0.0.1", "127.0.0.2"]})
    raster = read_aoi(f"{other_host.url}/{RED}", inner_aoi(sample_footprint), catalogue=both)
    assert raster.array.size > 0 and other_host.requests


def test_redirect_to_a_host_off_the_allow_list_is_refused(other_host, sample_footprint):
    with Redirector(lambda path: other_host.url + path) as redirector:
        href = f"{redirector.url}/{RED}"
        with pytest.raises(HrefRefused) as info:
            read_aoi(href, inner_aoi(sample_footprint), catalogue=ONLY_127_0_0_1)
    assert redirector.requests, "the allowed first hop was asked"
    assert other_host.requests == [], "the off-list host was never contacted"
    message = str(info.value)
    assert "redirected outside the policy" in message and "'127.0.0.2'" in message and "allow-list" in message


def test_a_chain_of_redirects_is_checked_at_every_hop(other_host, sample_footprint):
    with Redirector(lambda path: other_host.url + path) as last, \
            Redirector(lambda path: last.url + path, status=307) as first:
        with pytest.raises(HrefRefused):
            read_aoi(f"{first.url}/{RED}", inner_aoi(sample_footprint), catalogue=ONLY_127_0_0_1)
        assert first.requests and last.requests  # both allowed hops were followed
    assert other_host.requests == []


def test_redirect_within_the_allow_list_still_reads(sample_data_dir, sample_footprint):
    with RangeFileServer(sample_data_dir) as files, Redirector(lambda path: files.url + path) as redirector:
        raster = read_aoi(f"{redirector.url}/{RED}", inner_aoi(sample_footprint), catalogue=ONLY_127_0_0_1)
    assert raster.array.size > 0 and redirector.requests and files.requests


def test_redirect_to_file_url_is_refused(sample_data_dir, sample_footprint):
    local = (sample_data_dir / RED).resolve()
    with Redirector(lambda path: f"file://{local}") as redirector:
        with pytest.raises((HrefRefused, CogReadError)):
            read_aoi(f"{redirector.url}/{RED}", inner_aoi(sample_footprint), catalogue=ONLY_127_0_0_1)
    assert redirector.requests


def test_redirect_to_a_private_address_is_refused_without_the_opt_in(sample_data_dir, sample_footprint):
    # The first hop's name is allowed, but without allow_private_hosts the proxy refuses loopback targets:
    # the address the proxy resolved is what it checks and connects to.
    strict = ONLY_127_0_0_1.model_copy(update={"allowed_hosts": ["localhost", "127.0.0.1"],
                                               "allow_private_hosts": False})
    proxy = egress.guard()
    token = proxy.open_read(strict)
    try:
        with pytest.raises(HrefRefused, match="loopback"):
            proxy._vet("http://localhost:9/x.tif", strict)
    finally:
        proxy.close_read(token)


def _proxy_status(request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", egress.guard().port), timeout=10) as sock:
        sock.sendall(request)
        reply = sock.recv(4096).decode("latin-1")
    return int(reply.split(" ", 2)[1])


def test_the_proxy_is_not_an_open_relay(cog_server):
    target = cog_server.url.removeprefix("http://")
    assert _proxy_status(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()) == 407
    wrong = base64.b64encode(b"unirs:not-a-live-token").decode()
    request = f"GET {cog_server.url}/_stats HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {wrong}\r\n\r\n"
    assert _proxy_status(request.encode()) == 407
    proxy = egress.guard()
    token = proxy.open_read(ONLY_127_0_0_1)
    try:
        good = base64.b64encode(f"unirs:{token}".encode()).decode()
        ok = f"GET {cog_server.url}/_stats HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {good}\r\n\r\n"
        assert _proxy_status(ok.encode()) == 200
        off_list = f"CONNECT 127.0.0.2:443 HTTP/1.1\r\nProxy-Authorization: Basic {good}\r\n\r\n"
        assert _proxy_status(off_list.encode()) == 403
        assert any("127.0.0.2" in r.target for r in proxy.refusals(token))
    finally:
        proxy.close_read(token)
    assert _proxy_status(ok.encode()) == 407  # the token dies with its read


class _KeepAliveServer:
    """A loopback HTTP server that ignores ``Connection: close`` and answers every request it reads."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        chunk = conn.recv(4096)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.requests.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self._listener.close()


def test_a_reused_plain_http_proxy_connection_never_reaches_the_first_host_unvetted():
    # libcurl may reuse one proxy connection for a request to another host: the second request (for
    # 127.0.0.2, off the allow-list) must not be piped to the first, vetted upstream.
    upstream = _KeepAliveServer()
    proxy = egress.guard()
    token = proxy.open_read(ONLY_127_0_0_1)
    auth = base64.b64encode(f"unirs:{token}".encode()).decode()
    first = (f"GET http://127.0.0.1:{upstream.port}/first HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
             f"Proxy-Authorization: Basic {auth}\r\n\r\n")
    second = (f"GET http://127.0.0.2:{upstream.port}/second HTTP/1.1\r\nHost: 127.0.0.2:{upstream.port}\r\n"
              f"Proxy-Authorization: Basic {auth}\r\n\r\n")
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(first.encode())
            reply = b""
            while not reply.endswith(b"ok"):
                chunk = sock.recv(4096)
                assert chunk, "proxy closed before the first answer"
                reply += chunk
            sock.sendall(second.encode())
            rest = b""
            while chunk := sock.recv(4096):
                rest += chunk
        assert reply.startswith(b"HTTP/1.1 200")
        assert rest == b""  # the connection ends instead of answering for the other host
        upstream._thread.join(timeout=10)
        assert upstream.requests == ["GET /first HTTP/1.1"]
    finally:
        proxy.close_read(token)
        upstream.close()


# GDAL's /vsicurl/ remembers a failed URL for the life of the process and fails every later open of it
# without a request. These run twice in one process, as a Celery worker retrying a task does.

@pytest.mark.parametrize("status", [403, 404])
@pytest.mark.parametrize("through_session", [False, True], ids=["read_aoi", "session"])
def test_an_asset_that_failed_once_is_read_when_it_answers_again(sample_data_dir, sample_footprint, status,
                                                                 through_session):
    # A late publication: the item is out, its COG answers 404 (or 403) until the upload finishes.
    with RangeFileServer(sample_data_dir, fail_with=(status,)) as files:
        href = f"{files.url}/{RED}?status={status}&session={through_session}"

        def read():
            if not through_session:
                return read_aoi(href, inner_aoi(sample_footprint), catalogue=ONLY_127_0_0_1)
            with CogSession() as cogs:
                return read_aoi(href, inner_aoi(sample_footprint), catalogue=ONLY_127_0_0_1, session=cogs)

        with pytest.raises(CogReadError, match=f"HTTP response code: {status}"):
            read()
        asked_while_failing = len(files.requests)
        raster = read()
    assert raster.array.size > 0
    assert len(files.requests) > asked_while_failing, "the second read asked the server again"


def test_a_url_refused_once_for_its_redirect_reads_when_the_redirect_is_allowed(sample_data_dir, sample_footprint,
                                                                                 other_host):
    # The same URL first redirects off the allow-list (refused), then within it: the refusal is not
    # remembered (CI once failed test_redirect_within_the_allow_list_still_reads with "HTTP response code:
    # 403" when its redirector got the port an earlier test's refused redirector had had).
    with RangeFileServer(sample_data_dir) as files:
        target = {"url": other_host.url}
        with Redirector(lambda path: target["url"] + path) as redirector:
            href = f"{redirector.url}/{RED}"
            with pytest.raises(HrefRefused):
                read_aoi(href, inner_aoi(sample_footprint), catalogue=ONLY_127_0_0_1)
            target["url"] = files.url
            raster = read_aoi(href, inner_aoi(sample_footprint), catalogue=ONLY_127_0_0_1)
    assert raster.array.size > 0 and files.requests and other_host.requests == []
