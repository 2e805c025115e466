"""``unirs-worker`` (also ``unirs-monitor worker``): start a Celery analysis worker with the flags each role needs."""

from __future__ import annotations

import os
import shlex
import sys

import click


def worker_command(queues: str, concurrency: int | None, pool: str | None, loglevel: str, hostname: str | None,
                   max_tasks_per_child: int | None) -> tuple[list[str], dict[str, str]]:
    """The celery command line and the environment additions for a worker consuming ``queues``."""
    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in ("cpu", "gpu")]
    if not names or unknown:
        raise click.BadParameter(f"queues must be cpu, gpu or cpu,gpu (got {queues!r})", param_hint="--queues")
    gpu = "gpu" in names
    # CUDA is not fork-safe and one process per GPU keeps one model copy: GPU workers default to solo.
    pool = pool or ("solo" if gpu else "prefork")
    if pool == "solo":
        concurrency = 1
    elif concurrency is None:
        concurrency = max(1, (os.cpu_count() or 2) - 1) if not gpu else 1
    cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
           "--queues", ",".join(names), "--pool", pool, "--concurrency", str(concurrency),
           "--loglevel", loglevel, "-O", "fair",
           # No broadcast chatter: workers coordinate through the analyses table, not through each other.
           "--without-gossip", "--without-mingle"]
    if hostname:
        cmd += ["--hostname", hostname]
    if max_tasks_per_child and pool == "prefork":
        cmd += ["--max-tasks-per-child", str(max_tasks_per_child)]
    return cmd, {"UNIRS_WORKER_QUEUES": ",".join(names)}


@click.command("worker", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--queues", "-Q", default="cpu", show_default=True,
              help="cpu (raster prep + spectral analysis), gpu (UniRS model), or cpu,gpu for a single box.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: CPUs − 1 for cpu; always 1 with --pool solo).")
@click.option("--pool", "-P", type=click.Choice(["prefork", "solo", "threads"]), default=None,
              help="Default: solo for gpu (CUDA is not fork-safe; one process per GPU), prefork for cpu.")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Worker node name (default celery@<host>).")
@click.option("--max-tasks-per-child", type=click.IntRange(min=1), default=50, show_default=True,
              help="Recycle prefork processes after this many analyses (bounds memory growth).")
@click.option("--print-command", is_flag=True, help="Print the celery command instead of running it.")
def worker(queues: str, concurrency: int | None, pool: str | None, loglevel: str, hostname: str | None,
           max_tasks_per_child: int | None, print_command: bool) -> None:
    """Run an analysis worker (Celery) consuming the cpu and/or gpu queue.

    \b
    unirs-monitor worker --queues cpu --concurrency 2   # raster prep + spectral
    unirs-monitor worker --queues gpu                   # UniRS: --pool solo, model loaded once
    Start one gpu worker per GPU (CUDA_VISIBLE_DEVICES=<n>). The broker comes from UNIRS_BROKER_URL.
    """
    cmd, env = worker_command(queues, concurrency, pool, loglevel, hostname, max_tasks_per_child)
    if print_command:
        click.echo(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd))
        return
    os.environ.update(env)
    os.execv(cmd[0], cmd)  # replace this process: signals from the supervisor reach celery directly


def main() -> None:
    worker(prog_name="unirs-monitor worker")


if __name__ == "__main__":
    main()
