"""Celery tasks. Thin: everything an analysis does lives in workers/pipeline.py (testable without Celery)."""

from __future__ import annotations

import os

from workers.celery_app import TASK_NAME, app, settings


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def analyse(self, analysis_id: int) -> str:
    """Run analysis ``analysis_id`` (the message carries nothing else; the row says what to do)."""
    from workers.pipeline import run_analysis

    worker = f"{self.request.hostname or 'worker'} pid {os.getpid()}"
    return run_analysis(int(analysis_id), worker, settings)
