"""The declarative base, the column helpers and the status enums every table group uses."""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import (
    Enum,
    func,
)
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, values_callable=lambda e: [m.value for m in e], validate_strings=True)


class AreaStatus(enum.StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"


class AlertFrequency(enum.StrEnum):
    IMMEDIATE = "immediate"
    DAILY = "daily"
    OFF = "off"


class PairingPolicy(enum.StrEnum):
    LATEST = "latest"
    SEASONAL = "seasonal"


class ObservationStatus(enum.StrEnum):
    """Outcome of looking at one acquisition over one area (covered and clear fractions)."""

    PENDING = "pending"
    CLEAR = "clear"
    CLOUDY = "cloudy"
    PARTIAL = "partial"  # imaged too little of the area (tile edge, datastrip end): not cloud
    FAILED = "failed"


class AnalysisStatus(enum.StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"  # never sent, on purpose: ``skip_reason`` says why (e.g. "unsubscribed")


DEFAULT_ALERT_CLASSES = ("new_built_up_or_bare", "vegetation_loss")


def _now() -> Any:
    return func.now()


OPERATOR_EMAIL = "operator@localhost"
