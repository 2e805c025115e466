"""eo.cog.CogSession: each COG opened once for many window reads, every read still through the policy proxy
(real HTTP servers on 127.0.0.1 / 127.0.0.2, a real tiled DEFLATE COG)."""

from __future__ import annotations

import http.server
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.shutil import copy as rio_copy

from eo import cog
from eo.cog import BLOCK_CACHE_BYTES, CogSession, read_aoi
from eo.security import HrefRefused
from tests.fixtures_egress import _RANGE, RangeFileServer, _Server
from tests.test_security import LOOPBACK_OPT_IN

ONLY_127_0_0_1 = LOOPBACK_OPT_IN.model_copy(update={"allowed_hosts": ["127.0.0.1"]})
ORIGIN = (500_000.0, 5_000_000.0)
SIDE = 1024  # px at 10 m: 16 internal tiles of 256, far more bytes than GDAL's first header read


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory) -> Path:
    """``noise.tif``: random uint16 (incompressible, so tile data lies well past the header)."""
    root = tmp_path_factory.mktemp("cog-session")
    data = np.random.default_rng(13).integers(0, 10_000, (SIDE, SIDE), dtype=np.uint16)
    tmp = root / "noise.tmp.tif"
    with rasterio.open(tmp, "w", driver="GTiff", width=SIDE, height=SIDE, count=1, dtype="uint16", crs="EPSG:32634",
                       transform=Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]), nodata=0) as dst:
        dst.write(data, 1)
    rio_copy(tmp, root / "noise.tif", driver="COG", blocksize=256, compress="DEFLATE")
    tmp.unlink()
    return root


def window(k: int) -> tuple[float, float, float, float]:
    """The k-th 300 × 300 px window (overlapping its neighbours), bounds in EPSG:32634."""
    left, top = ORIGIN[0] + 2_000.0 * k, ORIGIN[1] - 1_500.0 * k
    return left, top - 3_000.0, left + 3_000.0, top


def read(href: str, k: int, session: CogSession | None = None) -> np.ndarray:
    return read_aoi(href, None, catalogue=ONLY_127_0_0_1, dst_crs="EPSG:32634", resolution=10.0, bounds=window(k),
                    indexes=1, aoi_mask=False, session=session).array


def test_a_session_opens_each_file_once_and_reads_what_separate_opens_read(noise_dir, monkeypatch):
    with RangeFileServer(noise_dir) as files:
        href = f"{files.url}/noise.tif"
        expected = [read(href, k) for k in range(3)]
        opened = []
        real_open = cog.rasterio.open
        monkeypatch.setattr(cog.rasterio, "open", lambda *a, **kw: opened.append(a[0]) or real_open(*a, **kw))
        with CogSession() as cogs:
            got = [read(href, k, cogs) for k in range(3)]
    assert len(opened) == 1  # without the session: one open per read (3)
    for k in range(3):
        assert got[k].shape == (1, 300, 300)
        np.testing.assert_array_equal(got[k], expected[k])
    assert int(rasterio.env.get_gdal_config("GDAL_CACHEMAX")) <= BLOCK_CACHE_BYTES


class _TileRedirector(_Server):
    """Serves ``root`` for HEAD and for ranges from byte 0 (the header GDAL reads when it opens a file);
    any other range (tile data) answers 302 to ``target`` — a hop only the policy proxy can catch."""

    def __init__(self, root: Path, target: str):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _serve(self, body: bool) -> None:
                outer.record(self.command, self.headers.get("Range", ""))
                data = (root / self.path.lstrip("/")).read_bytes()
                match = _RANGE.match(self.headers.get("Range", ""))
                if match and int(match.group(1)) > 0:
                    self.send_response(302)
                    self.send_header("Location", target + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = (0, len(data) - 1) if not match else (0, min(int(match.group(2)), len(data) - 1))
                self.send_response(206 if match else 200)
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                if body:
                    self.wfile.write(data[start:end + 1])

            def do_GET(self) -> None:
                self._serve(True)

            def do_HEAD(self) -> None:
                self._serve(False)

        super().__init__("127.0.0.1", Handler)


def test_tile_reads_through_an_open_session_dataset_still_pass_the_policy_proxy(noise_dir):
    with RangeFileServer(noise_dir, host="127.0.0.2") as off_list, _TileRedirector(noise_dir, off_list.url) as files:
        with CogSession() as cogs, pytest.raises(HrefRefused) as info:
            read(f"{files.url}/noise.tif", 0, cogs)
        assert any(r.startswith("bytes=0-") for _, r in files.requests)  # opened: the header was served
        assert any(r and not r.startswith("bytes=0-") for _, r in files.requests)  # a tile range was asked
    assert off_list.requests == []  # the redirect of the tile read never reached the off-list host
    assert "redirected outside the policy" in str(info.value) and "'127.0.0.2'" in str(info.value)
