"""`unirs-monitor`: the command line of the service.

Each command group lives next to the code it drives (``monitor/areas_cli.py`` for areas, and so on) and
is registered here, so ``unirs-monitor --help`` lists everything in one place.
"""

from __future__ import annotations

import click

from core import migrate
from core.config import get_settings
from core.logging import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING… (default: UNIRS_LOG_LEVEL or INFO).")
@click.version_option(package_name="unirs-monitor")
def cli(log_level: str | None) -> None:
    """UniRS Monitor: watch places on Earth change.

    Register watched areas, poll STAC catalogues for new Sentinel-2 / Landsat scenes, pair each new clear
    scene with an earlier one, analyse the pair (spectral change + the UniRS vision-language model), store
    findings in PostGIS and email alert reports.

    Configuration comes from UNIRS_* environment variables or a TOML file named by UNIRS_CONFIG
    (see the README's configuration reference).
    """
    settings = get_settings()
    setup_logging(log_level or settings.log_level, settings.log_format)


@cli.group()
def db() -> None:
    """Database schema management (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (idempotent)."""
    migrate.upgrade(revision=revision)
    click.echo(f"database at {revision}")


@db.command("current")
def db_current() -> None:
    """Show the current revision."""
    migrate.current()


def main() -> None:
    cli(prog_name="unirs-monitor")


# Command groups, each defined beside the code it drives.
from monitor.areas_cli import areas  # noqa: E402

cli.add_command(areas)

from monitor.doctor import doctor  # noqa: E402

cli.add_command(doctor)

from monitor.scheduler_cli import backfill, poll, scheduler  # noqa: E402

cli.add_command(scheduler)
cli.add_command(poll)
cli.add_command(backfill)

from monitor.findings_cli import findings  # noqa: E402

cli.add_command(findings)

from devtools.demo import demo  # noqa: E402

cli.add_command(demo)

from monitor.metrics import metrics  # noqa: E402

cli.add_command(metrics)



@cli.command("worker", add_help_option=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(args: tuple[str, ...]) -> None:
    """Run an analysis worker (Celery) on the cpu and/or gpu queue (`unirs-monitor worker --help`).

    The workers are a separate program (`unirs-worker`, workers/cli.py): the control plane starts it as a
    process and never imports it.
    """
    import os
    import sys

    os.execv(sys.executable, [sys.executable, "-m", "workers.cli", *args])


if __name__ == "__main__":
    main()
