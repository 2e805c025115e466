"""`unirs-monitor`: the command line of the service.

Each command group lives next to the code it drives (``monitor/areas_cli.py`` for areas, and so on) and
is registered here, so ``unirs-monitor --help`` lists everything in one place.
"""

from __future__ import annotations

from typing import Any

import click

from core import migrate
from core.config import ConfigError, Settings, get_settings
from core.logging import COMMAND_LEVEL, SERVICE_LEVEL, setup_logging

# Commands that run until stopped log what they do (INFO); one-shot commands only warnings and errors.
LONG_RUNNING = frozenset({"scheduler", "worker", "serve"})
_VERBOSITY = {1: "INFO", 2: "DEBUG"}


def hoist_log_options(args: list[str]) -> list[str]:
    """Move ``-v``/``-vv``/``--verbose`` and ``--log-level X`` from anywhere (before ``--``) to the front,
    where the group parses them: ``unirs-monitor areas list -v`` works like ``unirs-monitor -v areas list``."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg in ("--verbose",) or (arg.startswith("-v") and set(arg[1:]) == {"v"}):
            front.append(arg)
        elif arg == "--log-level" and i + 1 < len(args):
            front += args[i:i + 2]
            i += 1
        elif arg.startswith("--log-level="):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def _database_error(exc: Exception, settings: Settings | None) -> click.ClickException | None:
    """One line for the database errors an operator causes (not running, wrong URL, schema missing)."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    if settings is None:  # the settings themselves failed: reported as ConfigError before any database use
        return None
    if isinstance(exc, OperationalError):
        url = settings.database_url
        safe = url.split("@", 1)[-1] if "@" in url else url
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        return click.ClickException(
            f"cannot use the database {safe}: {reason} — is PostgreSQL running (scripts/setup-services) "
            "and UNIRS_DATABASE_URL right? `unirs-monitor doctor` checks everything"
        )
    if isinstance(exc, ProgrammingError):
        try:
            migrate.require_current(settings.database_url)
        except migrate.SchemaError as schema:
            return click.ClickException(str(schema))
        except Exception:  # the database itself is unusable: the original error is the better report
            return None
    return None


class UnirsGroup(click.Group):
    """The root group: log options anywhere on the line, and one-line errors for configuration, schema
    and database problems instead of tracebacks."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_log_options(list(args)))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, migrate.SchemaError) as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            friendly = _database_error(exc, ctx.obj)
            if friendly is None:
                raise
            raise friendly from None


@click.group(cls=UnirsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--log-level", default=None, metavar="LEVEL",
              help="DEBUG, INFO, WARNING, ERROR (default: UNIRS_LOG_LEVEL, else INFO for scheduler/worker/serve "
                   "and WARNING for other commands). Accepted anywhere on the command line.")
@click.option("-v", "--verbose", count=True, help="INFO (-v) or DEBUG (-vv) logs; anywhere on the command line.")
@click.version_option(package_name="unirs-monitor")
@click.pass_context
def cli(ctx: click.Context, log_level: str | None, verbose: int) -> None:
    """UniRS Monitor: watch places on Earth change.

    Register watched areas, poll STAC catalogues for new Sentinel-2 / Landsat scenes, pair each new clear
    scene with an earlier one, analyse the pair (spectral change + the UniRS vision-language model), store
    findings in PostGIS and email alert reports.

    Configuration comes from UNIRS_* environment variables or a TOML file named by UNIRS_CONFIG
    (see the README's configuration reference). First run on a new database: `unirs-monitor db upgrade`.
    """
    try:
        # The entry point: settings are read here, once; every command gets them as its context object.
        ctx.obj = settings = get_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    default = SERVICE_LEVEL if ctx.invoked_subcommand in LONG_RUNNING else COMMAND_LEVEL
    level = log_level or _VERBOSITY.get(min(verbose, 2)) or settings.log_level
    try:
        setup_logging(level, settings.log_format, default=default)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@cli.group()
def db() -> None:
    """Database schema management (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_obj
def db_upgrade(settings: Settings, revision: str) -> None:
    """Create the schema on a new database, or bring it up to REVISION (idempotent)."""
    migrate.upgrade(settings.database_url, revision=revision)
    click.echo(f"database at {revision}")


@db.command("current")
@click.pass_obj
def db_current(settings: Settings) -> None:
    """Show the current revision."""
    migrate.current(settings.database_url)


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

from monitor.deliveries_cli import deliveries  # noqa: E402
from monitor.metrics import metrics  # noqa: E402

cli.add_command(deliveries)

cli.add_command(metrics)

from monitor.health import health  # noqa: E402

cli.add_command(health)

from monitor.users_cli import users  # noqa: E402

cli.add_command(users)

from monitor.webhooks_cli import webhooks  # noqa: E402

cli.add_command(webhooks)


@cli.command("serve", add_help_option=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args: tuple[str, ...]) -> None:
    """Serve the web app and HTTP API (`unirs-monitor serve --help`; package web/)."""
    from web.cli import serve as serve_cmd

    serve_cmd.main(list(args), prog_name="unirs-monitor serve", standalone_mode=True)


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
