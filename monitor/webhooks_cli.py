"""`unirs-monitor webhooks …`: the HTTPS endpoints that receive an area's alerts as signed JSON events."""

from __future__ import annotations

import json

import click

# The service and the database layer are imported by the commands, so `webhooks -h` stays fast.


@click.group()
def webhooks() -> None:
    """Webhook endpoints: one signed JSON event (Standard Webhooks) per alert of the area.

    URLs must be https and public unless the host is in webhooks.allowed_private_hosts. The signing secret is
    printed once, by `add`; receivers verify each request with it (any Standard Webhooks library).
    """


def _settings():
    return click.get_current_context().find_root().obj


@webhooks.command("add")
@click.argument("area")
@click.argument("url")
@click.option("--description", default=None, help="A note for the owner (what receives it).")
def add_cmd(area: str, url: str, description: str | None) -> None:
    """Send the alerts of AREA (name or id) to URL. Prints the endpoint id and its signing secret."""
    from core.db import session_scope
    from monitor import areas as area_svc
    from monitor.reports import webhooks as svc

    settings = _settings()
    with session_scope(settings) as session:
        try:
            row = area_svc.get_area(session, area)
            endpoint = svc.add_endpoint(session, row, url, settings.webhooks, description)
        except (area_svc.AreaError, svc.WebhookError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"webhook {endpoint.id} added to area {row.name!r}: {endpoint.url}")
        click.echo(f"signing secret (shown only now): {endpoint.secret}")


@webhooks.command("list")
@click.option("--area", default=None, help="Only this area (name or id).")
@click.option("--json", "as_json", is_flag=True, help="JSON array instead of lines.")
def list_cmd(area: str | None, as_json: bool) -> None:
    """List webhook endpoints: id, area, enabled, URL."""
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import WebhookEndpoint
    from monitor import areas as area_svc
    from monitor.reports import webhooks as svc

    with session_scope(_settings()) as session:
        stmt = select(WebhookEndpoint).order_by(WebhookEndpoint.id)
        if area is not None:
            try:
                stmt = stmt.where(WebhookEndpoint.area_id == area_svc.get_area(session, area).id)
            except area_svc.AreaError as exc:
                raise click.ClickException(str(exc)) from None
        rows = [svc.endpoint_view(e) for e in session.scalars(stmt)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo("no webhook endpoints")
    for r in [] if as_json else rows:
        click.echo(f"{r['id']}\tarea {r['area_id']}\t{'enabled' if r['enabled'] else 'disabled'}\t{r['url']}")


def _set_enabled(webhook_id: int, enabled: bool) -> None:
    from core.db import session_scope
    from core.models import WebhookEndpoint
    from monitor.reports import webhooks as svc

    with session_scope(_settings()) as session:
        endpoint = session.get(WebhookEndpoint, webhook_id)
        if endpoint is None:
            raise click.ClickException(f"no webhook {webhook_id}; see `unirs-monitor webhooks list`")
        changed = svc.set_enabled(session, endpoint, enabled)
    state = "enabled" if enabled else "disabled"
    click.echo(f"webhook {webhook_id} {state}" if changed else f"webhook {webhook_id} was already {state}")


@webhooks.command("enable")
@click.argument("webhook_id", type=int)
def enable_cmd(webhook_id: int) -> None:
    """Send events to endpoint WEBHOOK_ID again (alerts of the time it was disabled stay unsent)."""
    _set_enabled(webhook_id, True)


@webhooks.command("disable")
@click.argument("webhook_id", type=int)
def disable_cmd(webhook_id: int) -> None:
    """Stop sending to endpoint WEBHOOK_ID: its events are marked skipped ("webhook disabled"), not sent."""
    _set_enabled(webhook_id, False)


@webhooks.command("remove")
@click.argument("webhook_id", type=int)
def remove_cmd(webhook_id: int) -> None:
    """Remove endpoint WEBHOOK_ID (its queued events go with it)."""
    from core.db import session_scope
    from core.models import WebhookEndpoint

    with session_scope(_settings()) as session:
        endpoint = session.get(WebhookEndpoint, webhook_id)
        if endpoint is None:
            raise click.ClickException(f"no webhook {webhook_id}; see `unirs-monitor webhooks list`")
        session.delete(endpoint)
    click.echo(f"webhook {webhook_id} removed")
