"""Benchmark of `unirs-monitor … --help`: this checkout against a baseline commit, in one run.

The baseline is the code of ``--baseline`` (default ``main``) checked out with ``git worktree add`` into a
temporary directory; both arms run ``python -m monitor.cli ARGS`` with PYTHONPATH on their tree and the
same venv, alternating, ``--repeat`` times per command. Figures per command: median CPU seconds of the
child (user + system, from wait4: what the import work costs, independent of other load on the host) and
median wall seconds. Last line: ``cli_help_cpu_s_after: X`` (the largest median CPU time of this checkout).

    .venv/bin/python benchmarks/bench_cli_help.py [--baseline REV] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["--help", "areas -h", "areas add -h", "findings -h", "users token -h", "webhooks -h",
            "deliveries -h", "metrics -h", "doctor -h", "health -h", "scheduler -h", "db upgrade -h", "demo -h",
            "serve --help"]


def run_once(tree: Path, args: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one `python -m monitor.cli ARGS` with PYTHONPATH=tree."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", *args], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) not in (0, 2):  # 2: a group given no subcommand shows its help
        raise SystemExit(f"{tree}: {' '.join(args)} exited {status}")
    return usage.ru_utime + usage.ru_stime, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main")
    parser.add_argument("--repeat", type=int, default=7)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cli-help-") as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), opts.baseline],
                       check=True)
        try:
            print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; baseline {opts.baseline}; "
                  f"median of {opts.repeat}")
            print(f"{'command':<18} {'cpu before':>11} {'cpu after':>10} {'wall before':>12} {'wall after':>11}")
            worst = 0.0
            for command in COMMANDS:
                args = command.split()
                runs: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
                for _ in range(opts.repeat):
                    runs["before"].append(run_once(base, args))
                    runs["after"].append(run_once(ROOT, args))
                cpu = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
                wall = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
                worst = max(worst, cpu["after"])
                print(f"{command:<18} {cpu['before']:>10.3f}s {cpu['after']:>9.3f}s {wall['before']:>11.3f}s "
                      f"{wall['after']:>10.3f}s")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=True)
    print(f"cli_help_cpu_s_after: {worst:.3f}")


if __name__ == "__main__":
    main()
