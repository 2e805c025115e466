"""`unirs-monitor users …`: the operator creates web/API accounts and tokens."""

from __future__ import annotations

import click

from monitor.choices import TOKEN_SCOPES

# monitor.accounts (argon2, SQLAlchemy) is imported by the commands, so `users -h` stays fast.


def _password(ctx_value: bool) -> str | None:
    if not ctx_value:
        return None
    return click.prompt("password", hide_input=True, confirmation_prompt=True)


@click.group()
def users() -> None:
    """Accounts of the web app and HTTP API (`unirs-monitor serve`)."""


@users.command("add")
@click.argument("email")
@click.option("--name", help="Display name.")
@click.option("--admin", is_flag=True, help="Sees and changes every area.")
@click.option("--password/--no-password", default=True, show_default=True,
              help="Ask for a browser-login password (reads stdin when it is not a terminal).")
def add_cmd(email: str, name: str | None, admin: bool, password: bool) -> None:
    """Create the account EMAIL."""
    from core.db import session_scope
    from monitor import accounts

    try:
        with session_scope(click.get_current_context().find_root().obj) as session:
            user = accounts.create_user(session, email, name=name, password=_password(password), admin=admin)
            click.echo(f"user {user.id} {user.email}{' (admin)' if admin else ''} created")
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from None


@users.command("passwd")
@click.argument("email")
def passwd_cmd(email: str) -> None:
    """Set the browser-login password of EMAIL."""
    from core.db import session_scope
    from monitor import accounts

    try:
        with session_scope(click.get_current_context().find_root().obj) as session:
            user = accounts.get_user(session, email)
            if user is None:
                raise accounts.AccountError(f"no user {email}")
            user.password_hash = accounts.hash_password(_password(True) or "")
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("password set")


@users.command("token")
@click.argument("email")
@click.option("--name", default="api", show_default=True, help="What the token is for.")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(TOKEN_SCOPES),
              help="read and/or write (repeatable; default both).")
def token_cmd(email: str, name: str, scopes: tuple[str, ...]) -> None:
    """Issue an API token for EMAIL and print it (shown this once; only its hash is stored)."""
    from core.db import session_scope
    from monitor import accounts

    try:
        with session_scope(click.get_current_context().find_root().obj) as session:
            user = accounts.get_user(session, email)
            if user is None:
                raise accounts.AccountError(f"no user {email} (create it with `unirs-monitor users add`)")
            click.echo(accounts.issue_token(session, user, name, list(scopes) or list(accounts.SCOPES)))
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from None


@users.command("revoke")
@click.argument("prefix")
def revoke_cmd(prefix: str) -> None:
    """Revoke the token whose prefix (the part after `unirs_`) is PREFIX."""
    from core.db import session_scope
    from monitor import accounts

    with session_scope(click.get_current_context().find_root().obj) as session:
        if not accounts.revoke_token(session, prefix):
            raise click.ClickException(f"no active token with prefix {prefix!r}")
    click.echo("token revoked")


@users.command("list")
def list_cmd() -> None:
    """Accounts with their number of areas and active tokens."""
    from sqlalchemy import func, select

    from core.db import session_scope
    from core.models import ApiToken, Area, User

    with session_scope(click.get_current_context().find_root().obj) as session:
        n_areas = select(func.count()).where(Area.owner_id == User.id).correlate(User).scalar_subquery()
        n_tokens = (select(func.count()).where(ApiToken.user_id == User.id, ApiToken.revoked_at.is_(None))
                    .correlate(User).scalar_subquery())
        rows = session.execute(select(User, n_areas, n_tokens).order_by(User.id)).all()
        for user, areas_n, tokens_n in rows:
            click.echo(f"{user.id}\t{user.email}\t{'admin' if user.is_admin else 'user'}\t{areas_n} areas\t"
                       f"{tokens_n} tokens\t{'password' if user.password_hash else 'no password'}")
