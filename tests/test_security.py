"""Asset hrefs from a catalogue are third-party input: only allow-listed public https hosts are opened."""

from __future__ import annotations

import socket

import pytest

from core.config import CatalogueSettings
from eo.cog import read_aoi
from eo.security import HrefRefused, check_href, host_allowed

PUBLIC = CatalogueSettings(
    name="earth-search", url="https://earth-search.aws.element84.com/v1",
    allowed_hosts=["sentinel-cogs.s3.us-west-2.amazonaws.com", "*.example.org", "127.0.0.1", "localhost",
                   "10.1.2.3", "169.254.169.254", "[::1]", "::1", "rebind.example.org"],
)
LOOPBACK_OPT_IN = CatalogueSettings(name="local", url="http://127.0.0.1:8082", allowed_schemes=["http"],
                                    allowed_hosts=["127.0.0.1"], allow_private_hosts=True)
GOOD = "https://sentinel-cogs.s3.us-west-2.amazonaws.com/sentinel-s2-l2a-cogs/34/T/ER/2020/8/B04.tif"


@pytest.fixture
def fake_dns(monkeypatch):
    """Resolve chosen names without a network: {name: [addresses]}."""
    table: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in table:
            family = {True: socket.AF_INET6, False: socket.AF_INET}
            return [(family[":" in a], socket.SOCK_STREAM, 6, "", (a, port)) for a in table[host]]
        if host == "sentinel-cogs.s3.us-west-2.amazonaws.com":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("52.92.1.10", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def test_allow_listed_public_https_is_accepted(fake_dns):
    assert check_href(GOOD, PUBLIC) == GOOD
    fake_dns["tiles.example.org"] = ["93.184.216.34"]
    assert check_href("https://tiles.example.org/a.tif", PUBLIC)


@pytest.mark.parametrize(
    ("href", "why"),
    [
        ("file:///etc/passwd", "file://"),
        ("/etc/passwd", "bare path"),
        ("../../../../etc/shadow", "bare path"),
        ("/vsicurl/https://sentinel-cogs.s3.us-west-2.amazonaws.com/x.tif", "GDAL virtual file system"),
        ("http://sentinel-cogs.s3.us-west-2.amazonaws.com/x.tif", "scheme 'http' is not allowed"),
        ("s3://sentinel-cogs/x.tif", "scheme 's3' is not allowed"),
        ("ftp://sentinel-cogs.s3.us-west-2.amazonaws.com/x.tif", "scheme 'ftp'"),
        ("https://evil.example.com/x.tif", "not on the allow-list"),
        ("https://sentinel-cogs.s3.us-west-2.amazonaws.com.evil.com/x.tif", "not on the allow-list"),
        ("https://example.org/x.tif", "not on the allow-list"),  # *.example.org is subdomains only
        ("https://sentinel-cogs.s3.us-west-2.amazonaws.com@169.254.169.254/x.tif", "credentials"),
        ("https://127.0.0.1/x.tif", "loopback"),
        ("https://[::1]/x.tif", "loopback"),
        ("https://169.254.169.254/latest/meta-data/iam/security-credentials/", "link-local"),
        ("https://10.1.2.3/x.tif", "private"),
        ("https://localhost/x.tif", "loopback"),
        ("https://sentinel-cogs.s3.us-west-2.amazonaws.com/a b.tif", "whitespace"),
        ("https://sentinel-cogs.s3.us-west-2.amazonaws.com/a\\..\\b.tif", "backslash"),
        ("", "non-empty"),
    ],
)
def test_hostile_hrefs_are_refused(href, why, fake_dns):
    with pytest.raises(HrefRefused, match=why):
        check_href(href, PUBLIC)


def test_hostname_resolving_to_private_or_loopback_is_refused(fake_dns):
    fake_dns["rebind.example.org"] = ["93.184.216.34", "127.0.0.1"]  # one bad address is enough
    with pytest.raises(HrefRefused, match=r"resolves to 127\.0\.0\.1\) is a loopback address"):
        check_href("https://rebind.example.org/x.tif", PUBLIC)
    fake_dns["meta.example.org"] = ["::ffff:169.254.169.254"]  # IPv4-mapped IPv6
    with pytest.raises(HrefRefused, match="link-local"):
        check_href("https://meta.example.org/x.tif", PUBLIC)
    fake_dns["cgnat.example.org"] = ["100.64.0.7"]  # shared address space: neither private nor global
    with pytest.raises(HrefRefused, match="not a globally routable"):
        check_href("https://cgnat.example.org/x.tif", PUBLIC)


def test_unresolvable_host_is_refused():
    catalogue = CatalogueSettings(name="x", url="https://x", allowed_hosts=["no-such-host.invalid"])
    with pytest.raises(HrefRefused, match="does not resolve"):
        check_href("https://no-such-host.invalid/x.tif", catalogue)


def test_loopback_only_with_explicit_opt_in():
    assert check_href("http://127.0.0.1:8083/cogs/a.tif", LOOPBACK_OPT_IN)
    no_opt_in = LOOPBACK_OPT_IN.model_copy(update={"allow_private_hosts": False})
    with pytest.raises(HrefRefused, match="loopback"):
        check_href("http://127.0.0.1:8083/cogs/a.tif", no_opt_in)
    # Opting in to private hosts does not open other hosts, other schemes or files.
    for href in ("http://10.0.0.5/visual.tif", "file:///etc/passwd", "https://127.0.0.1/x.tif"):
        with pytest.raises(HrefRefused):
            check_href(href, LOOPBACK_OPT_IN)


def test_host_patterns():
    assert host_allowed("A.Example.ORG.", ["*.example.org"])
    assert host_allowed("a.b.example.org", ["*.example.org"])
    assert not host_allowed("example.org", ["*.example.org"])
    assert not host_allowed("badexample.org", ["*.example.org"])
    assert not host_allowed("x.com", [])


def test_planetary_computer_signing_needs_the_optional_package(monkeypatch, fake_dns):
    import builtins

    real_import = builtins.__import__

    def no_pc(name, *args, **kwargs):
        if name == "planetary_computer":
            raise ImportError("No module named 'planetary_computer'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pc)
    pc = PUBLIC.model_copy(update={"signing": "planetary-computer"})
    with pytest.raises(RuntimeError, match=r"pip install 'unirs-monitor\[pc\]'"):
        check_href(GOOD, pc)


def test_read_aoi_never_opens_a_refused_href(cog_server, sample_footprint):
    before = cog_server.stats()["requests"]
    no_opt_in = LOOPBACK_OPT_IN.model_copy(update={"allow_private_hosts": False})
    with pytest.raises(HrefRefused):
        read_aoi(cog_server.href("cogs/2020-08-29/scl.tif"), sample_footprint, catalogue=no_opt_in)
    with pytest.raises(HrefRefused):
        read_aoi("file:///etc/passwd", sample_footprint, catalogue=LOOPBACK_OPT_IN)
    assert cog_server.stats()["requests"] == before


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1", "017700000001", "0177.0.0.1", "0",
                                  "0xa9.0xfe.0xa9.0xfe"])
def test_numeric_ipv4_forms_are_ip_literals_even_without_dns(host):
    # curl/GDAL (inet_aton) read these as 127.0.0.1, 0.0.0.0 or 169.254.169.254: the static (resolve=False)
    # check at ingest must treat them as the IP literals they are, not as names to look up later.
    cat = PUBLIC.model_copy(update={"allowed_hosts": [host]})
    with pytest.raises(HrefRefused, match=r"loopback|unspecified|link-local"):
        check_href(f"https://{host}/x.tif", cat, resolve=False, sign=False)
