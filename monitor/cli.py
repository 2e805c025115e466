"""`unirs-monitor`: the command line of the service.

Each command group lives next to the code it drives (``monitor/areas_cli.py`` for areas, and so on) and
is registered here, so ``unirs-monitor --help`` lists everything in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from core.config import Settings

# Heavy modules (pydantic settings, SQLAlchemy models, shapely, alembic...) are imported where a command
# runs, not here: `unirs-monitor --help` and every `-h` must answer without loading the service.

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

    from core import migrate

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


def help_requested(ctx: click.Context, args: list[str]) -> bool:
    """Whether the command line ``args`` (of the root group in ``ctx``) asks for some command's help:
    -h/--help, or a group given no subcommand.

    Parsed the way click parses them, level by level, so ``areas add x --name -h`` names an area "-h"
    rather than asking for help. Only the parsers run: no prompts, no value checks (the real parse
    reports those).
    """
    command, parent, args = ctx.command, ctx, list(args)
    while True:
        try:
            opts, rest, _ = command.make_parser(parent).parse_args(list(args))
        except click.UsageError:
            return False
        help_option = command.get_help_option(parent)
        if help_option is not None and opts.get(help_option.name):
            return True
        if help_option is None and not isinstance(command, click.Group):  # serve, worker: their own program
            return any(arg in ("-h", "--help") for arg in args[:args.index("--") if "--" in args else None])
        if not isinstance(command, click.Group):
            return False
        if not rest:
            return command.no_args_is_help
        try:
            name, sub, args = command.resolve_command(parent, rest)
        except click.UsageError:
            return False
        if sub is None:
            return False
        command, parent = sub, click.Context(sub, info_name=name, parent=parent, resilient_parsing=True)


class UnirsGroup(click.Group):
    """The root group: log options anywhere on the line, one-line errors for configuration, schema
    and database problems instead of tracebacks, and subcommands imported only when used.

    ``lazy`` maps a command name to (loader, one-line help): the loader imports the module that defines the
    command (a function-level import, so tests/test_architecture.py still sees it); the line is what
    ``--help`` lists, so listing the commands imports none of them (tests/test_cli_help.py checks that the
    lines are the commands' own).
    """

    def __init__(self, *args: Any, lazy: dict[str, tuple[Callable[[], click.Command], str]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            self.add_command(self.lazy[cmd_name][0](), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            if name in self.commands:
                command = self.commands[name]
            else:  # not imported: a stand-in with the command's one-line help, shortened the same way
                command = click.Command(name, help=self.lazy[name][1])
            if not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = hoist_log_options(list(args))
        ctx.meta["unirs.help_requested"] = help_requested(ctx, args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # click's own: --help, usage errors, aborted prompts
        except Exception as exc:
            from core import migrate
            from core.config import ConfigError

            if isinstance(exc, (ConfigError, migrate.SchemaError)):
                raise click.ClickException(str(exc)) from None
            friendly = _database_error(exc, ctx.obj)
            if friendly is None:
                raise
            raise friendly from None


# Command groups, each defined beside the code it drives, imported when named on the command line.
def _areas() -> click.Command:
    from monitor.areas_cli import areas
    return areas


def _doctor() -> click.Command:
    from monitor.doctor import doctor
    return doctor


def _scheduler() -> click.Command:
    from monitor.scheduler_cli import scheduler
    return scheduler


def _poll() -> click.Command:
    from monitor.scheduler_cli import poll
    return poll


def _backfill() -> click.Command:
    from monitor.scheduler_cli import backfill
    return backfill


def _findings() -> click.Command:
    from monitor.findings_cli import findings
    return findings


def _demo() -> click.Command:
    from devtools.demo import demo
    return demo


def _deliveries() -> click.Command:
    from monitor.deliveries_cli import deliveries
    return deliveries


def _metrics() -> click.Command:
    from monitor.metrics_cli import metrics
    return metrics


def _health() -> click.Command:
    from monitor.health import health
    return health


def _users() -> click.Command:
    from monitor.users_cli import users
    return users


def _webhooks() -> click.Command:
    from monitor.webhooks_cli import webhooks
    return webhooks


# (loader, the first paragraph of the command's help); tests/test_cli_help.py keeps the two in step.
LAZY_COMMANDS: dict[str, tuple[Callable[[], click.Command], str]] = {
    "areas": (_areas, "Register and manage watched areas."),
    "doctor": (_doctor, "Check configuration and connectivity: database + PostGIS + schema revision, broker, "
                        "each STAC catalogue, SMTP (or the outbox directory), email links (WARN: a public URL "
                        "without a shared secret), model weights, areas that alert nobody (WARN) and failed "
                        "observations of the last week (WARN). Exit status 1 if anything is wrong (FAIL)."),
    "scheduler": (_scheduler, "Run the service loop: poll catalogues, pair new scenes, dispatch analyses, send "
                              "reports."),
    "poll": (_poll, "Poll the configured STAC catalogues once (cron-style)."),
    "backfill": (_backfill, "Search the archive for AREA (name or id) since DATE, store the scenes and create "
                            "the analyses."),
    "findings": (_findings, "Search stored findings, newest first: a table, a GeoJSON FeatureCollection, or CSV "
                            "with WKT."),
    "demo": (_demo, "Run the whole loop on the bundled real Sentinel-2 sample (see scripts/demo)."),
    "deliveries": (_deliveries, "Email deliveries that did not reach their recipient."),
    "metrics": (_metrics, "Print the Prometheus metrics (read from the database) once, or serve them with "
                          "--serve PORT."),
    "health": (_health, "Health checks for containers: one line, exit status 0 (healthy) or 1."),
    "users": (_users, "Accounts of the web app and HTTP API (`unirs-monitor serve`)."),
    "webhooks": (_webhooks, "Webhook endpoints: one signed JSON event (Standard Webhooks) per alert of the area."),
}


@click.group(cls=UnirsGroup, lazy=LAZY_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    if ctx.meta.get("unirs.help_requested"):
        return  # the help needs neither settings nor logging (a broken configuration must not hide it)
    from core.config import ConfigError, get_settings
    from core.logging import COMMAND_LEVEL, SERVICE_LEVEL, setup_logging

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
    from core import migrate

    migrate.upgrade(settings.database_url, revision=revision)
    click.echo(f"database at {revision}")


@db.command("current")
@click.pass_obj
def db_current(settings: Settings) -> None:
    """Show the current revision."""
    from core import migrate

    migrate.current(settings.database_url)


def main() -> None:
    cli(prog_name="unirs-monitor")


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
