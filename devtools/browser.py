"""Command-line flags that keep Debian's Chromium on loopback (the browser tests, the email screenshots,
scripts/setup-browser).

Without them Chromium looks up accounts.google.com, update.googleapis.com and
content-autofill.googleapis.com on start (seen with ``strace -e connect`` in a new-user trial). The
resolver rule maps every host name to "not found" except 127.0.0.1, so nothing is resolved or fetched
beyond loopback even if a feature not switched off here tries. What stays: one UDP ``connect`` (no packet
sent) to a public IPv6 address, Chromium's way of asking the kernel for its own source address.
"""

from __future__ import annotations

CHROMIUM_PATH = "/usr/bin/chromium"

LOOPBACK_ONLY_FLAGS = (
    "--no-sandbox",  # root in a container
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-pings",
    "--no-first-run",
    "--password-store=basic",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication,DnsOverHttps",
)
