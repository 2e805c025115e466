"""Fixed vocabularies of the service, in a module that imports nothing, so the CLI can show them in its
help (``--kind [summary|region|...]``) without loading the database layer (see monitor/cli.py)."""

# Finding kinds stored in findings.kind (monitor/findings.py filters on them).
FINDING_KINDS = ("summary", "region", "answer", "event")

# API token scopes (monitor/accounts.py issues them, web/auth.py checks them).
TOKEN_SCOPES = ("read", "write")
