"""Which asset hrefs may be opened.

Asset hrefs come from a third party (the STAC catalogue). Opening one makes *this* machine fetch a URL,
so a hostile or broken catalogue could point us at the cloud metadata service (169.254.169.254), at a
database on loopback, at the private network, or at local files. Every URL that reaches GDAL therefore
goes through :func:`check_href` first:

- only the catalogue's ``allowed_schemes`` (https by default; http / s3 when configured), never
  ``file://``, GDAL ``/vsi…`` paths or bare paths;
- the host must be on the catalogue's ``allowed_hosts`` (exact name, or ``*.example.com`` for any
  subdomain);
- unless the catalogue sets ``allow_private_hosts`` (tests, the local demo), the host — an IP literal, or
  every address it resolves to — must be a public unicast address.

GDAL (libcurl) follows HTTP redirects and GDAL 3.10 has no option to turn that off, so asset reads go
through the loopback policy proxy of :mod:`eo.egress`, which applies this same check to every hop and
connects to the address it checked (no DNS-rebinding window). Deployments should still block egress to
metadata and private ranges at the network level.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from urllib.parse import SplitResult, urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import CatalogueSettings, Settings, WebhookSettings

logger = logging.getLogger(__name__)

# Characters that mean "this is not a plain URL" to Python or GDAL (GDAL splits option strings on some,
# and a URL parser disagreement is the classic allow-list bypass).
_FORBIDDEN_CHARS = set("\\ \t\r\n\x00") | {chr(c) for c in range(0x20)}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_INET_ATON_RE = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}")


class HrefRefused(ValueError):
    """An asset href that must not be opened; the message says why."""


def check_href(href: str, catalogue: CatalogueSettings, *, resolve: bool = True, sign: bool = True) -> str:
    """Return the URL to open for ``href``, or raise :class:`HrefRefused` with the reason.

    For catalogues with ``signing = "planetary-computer"`` the returned URL is signed (a SAS token is
    appended): call this right before opening, because tokens expire.

    ``resolve=False`` skips the DNS lookup (IP literals are still checked) and ``sign=False`` the signing:
    the cheap static check done at ingest time. Anything about to be opened uses the defaults.
    """
    if not isinstance(href, str) or not href:
        raise HrefRefused(f"href must be a non-empty string, got {href!r}")
    parts, port = _split(href, "href")
    if href.lower().startswith("/vsi"):  # a path, so urlsplit found no netloc to object to
        raise HrefRefused(f"href {href!r} is a GDAL virtual file system path")
    scheme = parts.scheme.lower()
    if not scheme:
        raise HrefRefused(f"href {href!r} is a bare path, not a URL")
    if scheme == "file":
        raise HrefRefused(f"href {href!r}: file:// URLs are never opened")
    allowed_schemes = {s.lower() for s in catalogue.allowed_schemes}
    if scheme not in allowed_schemes:
        raise HrefRefused(
            f"href {href!r}: scheme {scheme!r} is not allowed for catalogue {catalogue.name!r} "
            f"(allowed: {sorted(allowed_schemes)})"
        )
    if parts.username is not None or parts.password is not None:
        raise HrefRefused(f"href {href!r} carries credentials in the URL")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise HrefRefused(f"href {href!r} has no host")
    if not host_allowed(host, catalogue.allowed_hosts):
        raise HrefRefused(
            f"href {href!r}: host {host!r} is not on the allow-list of catalogue {catalogue.name!r} "
            f"({catalogue.allowed_hosts})"
        )
    if scheme != "s3" and not catalogue.allow_private_hosts:
        # s3:// "hosts" are bucket names; GDAL talks to the configured S3 endpoint, not to that name.
        _check_public(host, port or _DEFAULT_PORTS.get(scheme, 443), href, resolve=resolve)
    if sign and catalogue.signing == "planetary-computer":
        return sign_planetary_computer(href)
    return href


def check_webhook_url(url: str, webhooks: WebhookSettings, *, resolve: bool = True) -> str:
    """Return ``url`` if events may be POSTed to it, else raise :class:`HrefRefused` (see
    :func:`webhook_target`)."""
    return webhook_target(url, webhooks, resolve=resolve)[0]


def webhook_target(url: str, webhooks: WebhookSettings, *, resolve: bool = True) -> tuple[str, list[str]]:
    """``(url, addresses)``: the addresses the host resolved to and that were checked (connect to one of
    these, not to a new lookup: no DNS-rebinding window; empty with ``resolve=False``), or
    :class:`HrefRefused` with the reason.

    The asset-href rules with the allow-list turned round: any public host may receive events (the owner of
    the area chose it), but only over ``webhooks.allowed_schemes`` (https), without credentials in the URL,
    and loopback, private, link-local (cloud metadata) and reserved addresses are refused unless the host
    is on ``webhooks.allowed_private_hosts``. ``resolve=True`` checks every address the name resolves to.
    """
    if not isinstance(url, str) or not url or len(url) > 2048:
        raise HrefRefused("webhook URL must be a non-empty string of at most 2048 characters")
    parts, port = _split(url, "webhook URL")
    scheme = parts.scheme.lower()
    allowed = sorted({s.lower() for s in webhooks.allowed_schemes})
    if scheme not in allowed:
        raise HrefRefused(f"webhook URL {url!r}: scheme {scheme or 'none'!r} is not allowed (allowed: {allowed})")
    if parts.username is not None or parts.password is not None:
        raise HrefRefused(f"webhook URL {url!r} carries credentials; events are authenticated by their signature")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise HrefRefused(f"webhook URL {url!r} has no host")
    port = port or _DEFAULT_PORTS.get(scheme, 443)
    try:
        if host_allowed(host, webhooks.allowed_private_hosts):
            return url, _addresses(host, port, url) if resolve else []
        return url, [str(a) for a in _check_public(host, port, url, resolve=resolve)]
    except HrefRefused as exc:
        raise HrefRefused(str(exc).replace("href", "webhook URL", 1).replace(
            "set allow_private_hosts on the catalogue only for local test/demo setups",
            "add the host to webhooks.allowed_private_hosts to allow it")) from None


def _split(url: str, label: str) -> tuple[SplitResult, int | None]:
    """The checks every third-party URL gets first: no whitespace/control/backslash, a parseable port."""
    if any(ch in _FORBIDDEN_CHARS for ch in url):
        raise HrefRefused(f"{label} {url!r} contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        return parts, parts.port
    except ValueError as exc:
        raise HrefRefused(f"{label} {url!r} is not a valid URL: {exc}") from None


def host_allowed(host: str, allowed_hosts: list[str]) -> bool:
    """Exact match, or ``*.example.com`` matching any subdomain of example.com (not the apex)."""
    host = host.rstrip(".").lower()
    for pattern in allowed_hosts:
        pattern = pattern.strip().rstrip(".").lower()
        if not pattern:
            continue
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def _addresses(host: str, port: int, href: str) -> list[str]:
    literal = _ip_literal(host)
    if literal is not None:
        return [str(literal)]
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise HrefRefused(f"href {href!r}: host {host!r} does not resolve ({exc})") from None
    if not infos:
        raise HrefRefused(f"href {href!r}: host {host!r} resolves to no address")
    return [info[4][0].split("%", 1)[0] for info in infos]


def _check_public(host: str, port: int, href: str, *, resolve: bool = True) -> list:
    """The addresses of ``host`` (checked), or :class:`HrefRefused`; [] when not resolved."""
    literal = _ip_literal(host)
    if literal is None and not resolve:
        if host == "localhost" or host.endswith(".localhost"):
            raise HrefRefused(f"href {href!r}: host {host!r} is loopback by definition (RFC 6761)")
        return []
    addresses = [literal] if literal is not None else [ipaddress.ip_address(a) for a in _addresses(host, port, href)]
    for address in addresses:
        problem = non_public_reason(address)
        if problem:
            where = "" if literal is not None else f" (resolves to {address})"
            raise HrefRefused(
                f"href {href!r}: host {host!r}{where} is {problem}; set allow_private_hosts on the catalogue "
                "only for local test/demo setups"
            )
    return addresses


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        pass
    # curl (and so GDAL) also reads the inet_aton forms as IPv4 literals: 2130706433, 0x7f.1, 127.1, 0177.0.0.1.
    if _INET_ATON_RE.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def non_public_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is not a public unicast address, or None if it is one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    checks = (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address (cloud metadata lives there)"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private address"),
    )
    for attribute, label in checks:
        if getattr(address, attribute):
            return label
    if not address.is_global:
        return "not a globally routable address"
    return None


def sign_planetary_computer(href: str) -> str:
    """Append a Planetary Computer SAS token (the optional ``pc`` extra)."""
    try:
        import planetary_computer  # lazy: an optional dependency only PC deployments install
    except ImportError as exc:
        raise RuntimeError(
            "catalogue signing 'planetary-computer' needs the optional package: "
            "pip install 'unirs-monitor[pc]' (planetary-computer)"
        ) from exc
    return planetary_computer.sign(href)


def catalogue_for_id(session: Session, catalogue_id: int, settings: Settings) -> CatalogueSettings:
    """The configured catalogue behind a ``catalogues`` row (by its name)."""
    from core.models import Catalogue

    name = session.execute(select(Catalogue.name).where(Catalogue.id == catalogue_id)).scalar_one()
    return settings.catalogue(name)


def catalogue_for_scene(session: Session, scene, settings: Settings) -> CatalogueSettings:
    """The configured catalogue a :class:`core.models.Scene` came from (its hrefs' allow-list)."""
    return catalogue_for_id(session, scene.catalogue_id, settings)
