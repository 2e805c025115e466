"""The policy proxy keeps up with GDAL's parallel range reads (eo/egress.py), without relaxing the policy.

GDAL fetches the tiles of one window as parallel range requests, one proxy connection each, and the
workers run several reads at once. Two things used to cost a second each (benchmarks/bench_egress.py):
a listen backlog of 5 (the kernel dropped the surplus SYNs: 1 s retransmit), and answers that let libcurl
take a proxy connection the proxy is about to close for reusable.
"""

from __future__ import annotations

import base64
import socket
import struct

import numpy as np
import rasterio

from eo import egress
from eo.cog import read_aoi
from tests.fixtures_egress import RangeFileServer
from tests.test_security import LOOPBACK_OPT_IN

RED = "cogs/2020-08-29/red.tif"
ONLY_127_0_0_1 = LOOPBACK_OPT_IN.model_copy(update={"allowed_hosts": ["127.0.0.1"]})


def _accept_queue(listener: socket.socket) -> tuple[int, int]:
    """(connections waiting in the accept queue, its limit), as Linux reports them for a listening socket
    (``tcpi_unacked`` / ``tcpi_sacked`` of TCP_INFO, what ``ss -l`` shows as Recv-Q / Send-Q)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    unacked, sacked = struct.unpack_from("8B6I", info)[12:14]
    return unacked, sacked


def test_a_burst_of_connections_waits_in_the_queue_instead_of_being_dropped():
    # The proxy's server class, not accepting (as when its threads are busy): every connection of a burst
    # the size of a few parallel window reads must complete its handshake into the accept queue.
    server = egress._Server(("127.0.0.1", 0), egress.socketserver.BaseRequestHandler)
    clients = []
    try:
        for _ in range(48):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(server.server_address)
            clients.append(client)
        waiting, limit = _accept_queue(server.socket)
        assert limit >= 64
        assert waiting == 48, f"{48 - waiting} of 48 connections dropped (they would wait out a SYN retransmit)"
    finally:
        for client in clients:
            client.close()
        server.server_close()


def test_the_running_proxy_listens_with_the_large_backlog():
    assert _accept_queue(egress.guard()._server.socket)[1] >= 64


def _proxied_get(proxy: egress.EgressGuard, token: str, url: str, extra: str = "") -> bytes:
    auth = base64.b64encode(f"unirs:{token}".encode()).decode()
    host = url.split("/")[2]
    request = f"GET {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: Basic {auth}\r\n{extra}\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(request.encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_a_proxied_http_answer_tells_the_client_the_connection_ends(sample_data_dir):
    proxy = egress.guard()
    token = proxy.open_read(ONLY_127_0_0_1)
    try:
        with RangeFileServer(sample_data_dir) as files:
            reply = _proxied_get(proxy, token, f"{files.url}/{RED}", "Range: bytes=0-99\r\nConnection: keep-alive\r\n")
    finally:
        proxy.close_read(token)
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].split(" ")[1] == "206"
    hop = [line.lower() for line in lines[1:] if line.split(":")[0].strip().lower() in ("connection", "keep-alive")]
    assert hop == ["connection: close"]  # the upstream's own keep-alive is not passed on
    assert "proxy-connection: close" in [line.lower() for line in lines[1:]]
    assert body == (sample_data_dir / RED).read_bytes()[:100]  # the body untouched


def test_parallel_window_reads_through_the_proxy_read_the_file_exactly(sample_data_dir):
    # Many tiles per window, several windows at once: what the workers do, every request vetted.
    from concurrent.futures import ThreadPoolExecutor

    path = sample_data_dir / RED
    with rasterio.open(path) as src:
        expected, bounds, crs = src.read(1), tuple(src.bounds), src.crs
    with RangeFileServer(sample_data_dir) as files:
        def read(_: int) -> np.ndarray:
            return read_aoi(f"{files.url}/{RED}", None, catalogue=ONLY_127_0_0_1, bounds=bounds, dst_crs=crs,
                            aoi_mask=False).array[0]

        with ThreadPoolExecutor(max_workers=6) as pool:
            arrays = list(pool.map(read, range(12)))
        assert files.requests
    for array in arrays:
        np.testing.assert_array_equal(array, expected)
