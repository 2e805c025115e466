"""`unirs-monitor deliveries …`: the emails that need an operator (outcome unknown, or failed)."""

from __future__ import annotations

import json

import click

# The ledger (SQLAlchemy, the models) is imported by the commands, so `deliveries -h` stays fast.


@click.group()
def deliveries() -> None:
    """Email deliveries that did not reach their recipient.

    "Outcome unknown" means the process sending the email died during the SMTP conversation: the server
    may or may not have accepted it, so it is not resent automatically (nobody gets an alert twice).
    Check the mail server's log for the Message-ID, then `requeue` it if it never left.
    """


@deliveries.command("list")
@click.option("--unknown", "unknown_only", is_flag=True, help="Only deliveries whose outcome is unknown.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON array instead of lines.")
def list_cmd(unknown_only: bool, limit: int, as_json: bool) -> None:
    """List failed deliveries (oldest first): id, kind, recipient, what it was about, the error."""
    from core.db import session_scope
    from monitor.reports import ledger

    with session_scope(click.get_current_context().find_root().obj) as session:
        rows = ledger.problems(session, unknown_only=unknown_only, limit=limit)
    if as_json:
        click.echo(json.dumps([{**r.__dict__, "created_at": r.created_at.isoformat()} for r in rows], indent=2))
        return
    if not rows:
        click.echo("no deliveries with an unknown outcome" if unknown_only else "no failed deliveries")
        return
    for r in rows:
        click.echo(f"{r.id}\t{r.kind}\t{r.recipient}\t{r.delivery_key}\t{r.created_at:%Y-%m-%d %H:%M}Z\t"
                   f"{(r.last_error or '').splitlines()[0][:160] if r.last_error else ''}")


@deliveries.command("requeue")
@click.argument("delivery_id", type=int)
def requeue_cmd(delivery_id: int) -> None:
    """Send failed delivery DELIVERY_ID again (same Message-ID, so a mail archive can deduplicate it)."""
    from core.db import session_scope
    from monitor.reports import ledger

    with session_scope(click.get_current_context().find_root().obj) as session:
        if not ledger.requeue(session, delivery_id):
            raise click.ClickException(
                f"delivery {delivery_id} is not failed (or does not exist); see `unirs-monitor deliveries list`")
    click.echo(f"delivery {delivery_id} requeued; the next report run sends it")
