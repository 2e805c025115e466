"""Benchmark: what the asset-read policy proxy (eo/egress.py) costs per read, side by side in one run.

Every ``eo.cog.read_aoi`` of an http(s) href opens a fresh proxy token (``EgressGuard.open_read``), points
GDAL at the loopback proxy with it, and closes it afterwards; every HTTP request then passes the proxy
(one connection per request, ``Connection: close``). Arms, all through ``read_aoi`` against a local COG
server on loopback (``devtools.localstac.CogServer``):

1. **small reads** — every band of every date of the real Sentinel-2 sample (1 × 1 km COGs, a few
   requests each): ``token per read`` (the code as it is), ``token reused`` (one token per catalogue, kept
   open: the alternative), ``no proxy`` (GDAL straight to the server: the floor). The token's own cost is
   the difference of the first two.
2. **large reads under load** — 4 threads reading 2,000 × 2,000 px windows of a synthetic 6,000 ×
   6,000 px uint16 COG (what one analysis block reads) while the main thread does numpy and Python work,
   as a worker does: through the proxy (token per read) vs no proxy — what the proxy as a whole costs —
   and through the proxy of the ``--baseline`` revision (its ``eo/egress.py`` loaded from git, same
   process, same reads): before/after in one run.

Prints ms per read for each arm, ``egress_token_ms_per_read`` (token per read − token reused, small
reads) and ends with ``egress_proxy_over_direct_large: X`` (proxy / no proxy, large reads). Timings on a
shared machine are noisy: compare arms of one run (``--runs``).
Run: ``.venv/bin/python benchmarks/bench_egress.py [--runs 3] [--baseline REV]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import CatalogueSettings
from devtools import localstac
from eo import cog, egress

CATALOGUE = CatalogueSettings(name="bench", url="http://127.0.0.1/", allowed_schemes=["http"],
                              allowed_hosts=["127.0.0.1"], allow_private_hosts=True)
SIDE = 6000
WINDOW = 2000
ROOT = Path(__file__).resolve().parents[1]
# main when issue 13's read-side work started: the proxy with socketserver's backlog of 5.
BASELINE_REV = "4e3669f"


def baseline_egress(rev: str) -> types.ModuleType:
    """``eo/egress.py`` as of ``rev``, loaded as its own module (its own proxy, started on first use)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:eo/egress.py"], capture_output=True, check=True,
                            text=True).stdout
    module = types.ModuleType(f"egress_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:eo/egress.py", "exec"), module.__dict__)
    return module


class Arm:
    """Switches the proxy behaviour for the duration of a ``with`` block."""

    def __init__(self, mode: str, baseline: types.ModuleType | None = None):
        self.mode = mode
        self.baseline = baseline

    def __enter__(self):
        self.saved = (egress.uses_proxy, egress.EgressGuard.open_read, egress.EgressGuard.close_read)
        if self.mode.startswith("baseline"):
            cog.egress = self.baseline
        elif self.mode == "no proxy":
            cog.egress.uses_proxy = lambda url: False
        elif self.mode == "token reused":
            tokens: dict[str, str] = {}
            open_read = self.saved[1]

            def reused(guard, catalogue):
                if catalogue.name not in tokens:
                    tokens[catalogue.name] = open_read(guard, catalogue)
                return tokens[catalogue.name]

            egress.EgressGuard.open_read = reused
            egress.EgressGuard.close_read = lambda guard, token: None
        return self

    def __exit__(self, *exc):
        cog.egress = egress
        egress.uses_proxy, egress.EgressGuard.open_read, egress.EgressGuard.close_read = self.saved


def small_reads(base_url: str) -> float:
    """Seconds for one read_aoi of every sample band of every date (whole file, its own grid)."""
    hrefs = sorted(p.relative_to(localstac.SAMPLE_DATA_DIR).as_posix()
                   for p in (localstac.SAMPLE_DATA_DIR / "cogs").glob("*/*.tif") if p.stem != "visual")
    t = time.perf_counter()
    for href in hrefs:
        with rasterio.open(localstac.SAMPLE_DATA_DIR / href) as src:
            bounds = tuple(src.bounds)
        cog.read_aoi(f"{base_url}/{href}", None, catalogue=CATALOGUE, bounds=bounds, aoi_mask=False)
    return (time.perf_counter() - t) / len(hrefs)


def build_large(path: Path) -> None:
    from affine import Affine
    from rasterio.shutil import copy as rio_copy

    rng = np.random.default_rng(3)
    # Smooth field + noise: compresses like reflectance (about half), so answers are MB-sized.
    base = np.cumsum(rng.integers(-20, 21, (SIDE, SIDE), dtype=np.int32), axis=1) % 4000 + 1000
    data = (base + rng.integers(0, 200, (SIDE, SIDE))).astype(np.uint16)
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", driver="GTiff", width=SIDE, height=SIDE, count=1, dtype="uint16", crs="EPSG:32634",
                       transform=Affine(10, 0, 500000, 0, -10, 5100000), nodata=0, tiled=True) as dst:
        dst.write(data, 1)
    rio_copy(tmp, path, driver="COG", blocksize=256, compress="DEFLATE", predictor=2)
    tmp.unlink()


def large_reads(url: str) -> float:
    """Seconds per 2,000 × 2,000 px window read, 4 threads, main thread busy meanwhile."""
    offsets = [(r, c) for r in range(0, SIDE - WINDOW + 1, WINDOW) for c in range(0, SIDE - WINDOW + 1, WINDOW)]

    def read(offset):
        r, c = offset
        left, top = 500000 + c * 10, 5100000 - r * 10
        cog.read_aoi(url, None, catalogue=CATALOGUE, dst_crs="EPSG:32634", resolution=10.0,
                     bounds=(left, top - WINDOW * 10, left + WINDOW * 10, top), aoi_mask=False)

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(read, o) for o in offsets]
        work = np.random.default_rng(1).random((512, 512))
        while not all(f.done() for f in futures):
            # What a worker's main thread does between reads: numpy, and Python loops holding the GIL.
            work = np.sqrt(work + 1.0)
            sum(i * i for i in range(20_000))
        for f in futures:
            f.result()
    return (time.perf_counter() - t) / len(offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE_REV)
    args = parser.parse_args()
    baseline = baseline_egress(args.baseline)
    small: dict[str, list[float]] = {"token per read": [], "token reused": [], "no proxy": []}
    large: dict[str, list[float]] = {f"baseline {args.baseline}": [], "token per read": [], "no proxy": []}
    with tempfile.TemporaryDirectory(prefix="unirs-bench-egress-") as tmp:
        build_large(Path(tmp) / "large.tif")
        with localstac.CogServer(localstac.SAMPLE_DATA_DIR) as sample, localstac.CogServer(Path(tmp)) as big:
            small_reads(sample.url)  # GDAL's header cache and the proxy thread warmed for every arm alike
            for _ in range(args.runs):
                for mode in small:
                    with Arm(mode):
                        small[mode].append(small_reads(sample.url))
                for mode in large:
                    with Arm(mode, baseline):
                        large[mode].append(large_reads(f"{big.url}/large.tif"))
    print("small reads (sample COGs, 1 x 1 km), ms per read_aoi, median of runs:")
    for mode, values in small.items():
        print(f"  {mode:<16} {statistics.median(values) * 1000:8.2f} ms")
    print(f"large reads ({WINDOW} x {WINDOW} px windows, 4 threads, main thread busy), ms per read:")
    for label, values in large.items():
        print(f"  {label:<16} {statistics.median(values) * 1000:8.1f} ms")
    direct = statistics.median(large["no proxy"])
    before = statistics.median(large[f"baseline {args.baseline}"])
    proxy = statistics.median(large["token per read"]) / direct
    print(f"proxy / no proxy, large reads: baseline {args.baseline} {before / direct:.2f}x, this code {proxy:.2f}x")
    token = (statistics.median(small["token per read"]) - statistics.median(small["token reused"])) * 1000
    print(f"egress_token_ms_per_read: {token:.2f}")
    print(f"egress_proxy_over_direct_large: {proxy:.2f}")


if __name__ == "__main__":
    main()
