"""Alert reports: what to tell whom, rendered as email, delivered exactly once (see ``ledger``).

Modules, one job each: ``context`` (read an analysis into plain objects), ``render`` (Jinja2 templates
in ``templates/``), ``message`` (MIME assembly), ``transport`` (SMTP or outbox), ``ledger`` (the
deliveries table and its state machine), ``immediate`` and ``digest`` (what becomes a delivery), and
``runner`` (:func:`run_deliveries`, the scheduler's periodic job).
"""

from monitor.reports.runner import run_deliveries

__all__ = ["run_deliveries"]
