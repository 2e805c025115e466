"""Accounts and watched areas: users, areas, API tokens, login failures, unsubscribes, webhooks."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from geoalchemy2 import Geometry, WKBElement
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import (
    DEFAULT_ALERT_CLASSES,
    OPERATOR_EMAIL,
    AlertFrequency,
    AreaStatus,
    Base,
    PairingPolicy,
    _enum,
    _now,
)


class User(Base):
    """An account of the web app / API. ``is_admin`` sees and changes every area; others only their own."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(Text, unique=True)  # stored lower-case
    name: Mapped[str | None] = mapped_column(Text)
    password_hash: Mapped[str | None] = mapped_column(Text)  # argon2 (pwdlib); None = no browser login
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Area(Base):
    """A watched area: a polygon plus what to look for and whom to tell."""

    __tablename__ = "areas"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Who sees and changes it (web API, revision 0006). Unset = the operator account the migration creates,
    # so the CLI and the scheduler need not know about accounts.
    owner_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="RESTRICT"), index=True,
        default=select(User.id).where(User.email == OPERATOR_EMAIL).scalar_subquery(),
    )
    geom: Mapped[WKBElement] = mapped_column(Geometry("MULTIPOLYGON", srid=4326, spatial_index=False))
    area_km2: Mapped[float] = mapped_column(Float)
    status: Mapped[AreaStatus] = mapped_column(_enum(AreaStatus, "area_status"), default=AreaStatus.ACTIVE)
    collections: Mapped[list[str]] = mapped_column(ARRAY(Text), default=lambda: ["sentinel-2-l2a"])
    # Scene-level cloud filter sent to the catalogue (loose: the AOI clear fraction decides later).
    max_cloud_cover: Mapped[float] = mapped_column(Float, default=80.0)
    min_clear_fraction: Mapped[float] = mapped_column(Float, default=0.7)  # of the imaged pixels
    # An acquisition imaging less of the area than this is "partial", never "cloudy" (revision 0008).
    min_covered_fraction: Mapped[float] = mapped_column(Float, default=0.5, server_default=text("0.5"))
    recipients: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    questions: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)  # question template ids
    alert_frequency: Mapped[AlertFrequency] = mapped_column(
        _enum(AlertFrequency, "alert_frequency"), default=AlertFrequency.IMMEDIATE
    )
    # Which change classes alert (eo/change_classes.py; default the loss classes, repeated here because
    # core imports nothing above it) and the smallest alerting area, in hectares, that sends an alert.
    alert_classes: Mapped[list[str]] = mapped_column(
        ARRAY(Text), default=lambda: list(DEFAULT_ALERT_CLASSES),
        server_default=text("'{new_built_up_or_bare,vegetation_loss}'::text[]"),
    )
    min_alert_hectares: Mapped[float] = mapped_column(Float, default=0.2)
    # "probable": alert on first detection; "confirmed": only once the next clear acquisition still shows it.
    alert_on: Mapped[str] = mapped_column(Text, default="probable", server_default=text("'probable'"))
    pairing_policy: Mapped[PairingPolicy] = mapped_column(
        _enum(PairingPolicy, "pairing_policy"), default=PairingPolicy.LATEST
    )
    properties: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)  # user GeoJSON properties
    last_digest_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now(), onupdate=_now())

    __table_args__ = (
        Index("ix_areas_geom", "geom", postgresql_using="gist"),
        CheckConstraint("alert_on IN ('probable', 'confirmed')", name="ck_areas_alert_on"),
    )


class ApiToken(Base):
    """An API token: ``unirs_<prefix>_<secret>``; only the argon2 hash of the whole token is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(Text)
    prefix: Mapped[str] = mapped_column(Text, unique=True)  # public part: finds the row without a hash scan
    token_hash: Mapped[str] = mapped_column(Text)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))  # "read", "write"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LoginFailure(Base):
    """A failed browser login, per key (``email:…`` / ``ip:…``): the rate limit shared by all web replicas."""

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    __table_args__ = (Index("ix_login_failures_key_at", "key", "at"),)


class Unsubscribe(Base):
    """A recipient who asked (one-click link, RFC 8058) to receive nothing more about an area."""

    __tablename__ = "unsubscribes"

    area_id: Mapped[int] = mapped_column(ForeignKey("areas.id", ondelete="CASCADE"), primary_key=True)
    recipient: Mapped[str] = mapped_column(Text, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class WebhookEndpoint(Base):
    """An HTTPS endpoint that receives one signed JSON event (Standard Webhooks) per alert of an area.

    ``secret`` (``whsec_`` + base64) signs the events, so it is stored as is; it is shown once, at creation."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    area_id: Mapped[int] = mapped_column(ForeignKey("areas.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    __table_args__ = (UniqueConstraint("area_id", "url", name="uq_webhook_endpoints_area_url"),)
