"""The web app and HTTP API of UniRS Monitor (`unirs-monitor serve`): FastAPI on the shared core/.

Stateless: every request reads the database; sessions live in signed cookies, so several replicas behind a
proxy need only the same ``UNIRS_WEB__SECRET``. Control-plane logic (area validation, accounts, findings
queries) is reused from ``monitor``; ``workers`` is never imported.
"""
