"""Benchmark: the compute of a pair's analysis without its reads — the spectral step over every block of
bench_pipeline's 1,000 km² pair, from memory, this code side by side with a baseline revision, in one run.

Data: bench_pipeline's mirrored Sentinel-2 COGs (real pixels, synthetic scene), served on loopback; the
pair is read once, block by block (``workers.tiling.analyse_pair``'s ``on_block``), and the blocks are
saved. Each arm then loads the same blocks in a fresh subprocess and times, per block, the spectral step
(``SpectralAccumulator.add``: indices, classes, regions and their statistics) and the thumbnail canvas
(``Thumbs.add`` with the true colour of both scenes), then ``finish`` (regions merged across block edges,
EPSG:4326, caption). The HTTP reads (bench_pipeline, bench_egress) are not in these figures.

Figures: seconds (best of ``--runs``), and the answer each arm found (changed ha, regions kept, regions
dropped) — they must be the same. Run: ``.venv/bin/python benchmarks/bench_compute.py [--km2 1000]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline

ROOT = bench_pipeline.ROOT
BASELINE_REV = "4e3669f"  # main when issue 13's compute work started


def capture(args: argparse.Namespace) -> None:
    """Read the pair block by block with this checkout and pickle its grid, survey and blocks."""
    sys.path.insert(0, str(ROOT))
    from core.config import AnalysisSettings, CatalogueSettings
    from workers.tiling import analyse_pair

    settings = AnalysisSettings()
    catalogue = CatalogueSettings(name="bench", url=args.url, allowed_schemes=["http"], allowed_hosts=["127.0.0.1"],
                                  allow_private_hosts=True)
    before, after = bench_pipeline.scene_refs(args.url, catalogue, bench_pipeline.ZONES[0])
    blocks = []
    pair, _ = analyse_pair(bench_pipeline.area_geometry(args.km2, bench_pipeline.ZONES[0]), before, after, settings,
                           on_block=blocks.append)
    with open(args.blocks, "wb") as f:
        pickle.dump((pair.grid, pair.survey, settings.min_mapping_unit_ha, pair.valid_fraction,
                     (before.acquired_at, after.acquired_at), blocks), f)
    print(json.dumps({"blocks": len(blocks)}))


def child(args: argparse.Namespace) -> None:
    """The spectral step over the saved blocks with the code under ``--code``; prints one JSON line."""
    sys.path.insert(0, args.code)
    from workers import render
    from workers.spectral import PairFacts, SpectralAccumulator
    from workers.tiling import Thumbs

    with open(args.blocks, "rb") as f:
        grid, survey, min_ha, valid_fraction, acquired, blocks = pickle.load(f)
    best = math.inf
    for _ in range(args.runs):
        started = time.perf_counter()
        spectral, thumbs = SpectralAccumulator(grid, survey, min_ha), Thumbs.for_grid(grid)
        for block in blocks:
            spectral.add(block)
            if hasattr(thumbs, "add_block"):  # decimated before stacking
                thumbs.add_block(block)
            else:
                thumbs.add(block, render.rgb_of(block.before), render.rgb_of(block.after))
        result = spectral.finish(PairFacts(grid=grid, survey=survey, valid_fraction=valid_fraction, notes=[],
                                           acquired=acquired))
        best = min(best, time.perf_counter() - started)
    print(json.dumps({"seconds": best, "blocks": len(blocks), "changed_ha": result.metrics["changed_ha"],
                      "regions": len(result.regions), "dropped": result.regions_dropped,
                      "region_ha": round(sum(r.hectares for r in result.regions), 2)}))


def run(cmd: list[str], code: Path) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(code)),
                          timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd[:3])}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--km2", type=float, default=1000.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--baseline", default=BASELINE_REV)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--blocks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.capture:
        capture(args)
        return
    sys.path.insert(0, str(ROOT))
    from devtools import localstac

    side_km = max(12, math.ceil(math.sqrt(args.km2)) + 6)
    side_km += side_km % 2
    with tempfile.TemporaryDirectory(prefix="unirs-bench-compute-") as tmp:
        root = Path(tmp)
        bench_pipeline.build_cogs(root / "cogs", side_km)
        blocks = root / "blocks.pickle"
        with localstac.CogServer(root) as server:
            run([sys.executable, __file__, "--capture", "--url", f"{server.url}/cogs", "--km2", str(args.km2),
                 "--blocks", str(blocks)], ROOT)
        arms = {"baseline": bench_pipeline.export(args.baseline, root / "baseline"), "current": ROOT}
        results = {arm: run([sys.executable, __file__, "--child", "--code", str(code), "--blocks", str(blocks),
                             "--runs", str(args.runs)], code) for arm, code in arms.items()}
    b, c = results["baseline"], results["current"]
    print(f"{args.km2:g} km2, {c['blocks']} blocks, spectral step + thumbnail canvas from memory "
          f"(best of {args.runs}):")
    for arm, r in results.items():
        print(f"  {arm:8} {r['seconds']:7.2f} s   changed {r['changed_ha']:.1f} ha, {r['regions']} regions "
              f"({r['region_ha']} ha), {r['dropped']} dropped")
    same = all(b[k] == c[k] for k in ("changed_ha", "regions", "dropped", "region_ha"))
    print(f"ratio {b['seconds'] / c['seconds']:.2f}x; answers {'identical' if same else 'DIFFER'}")
    print(f"compute_{args.km2:g}km2_seconds: {c['seconds']:.2f}")


if __name__ == "__main__":
    main()
