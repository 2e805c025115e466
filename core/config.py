"""The one settings object of UniRS Monitor.

Values come, in increasing priority, from the defaults below (a local run on loopback), an optional TOML
file (path in ``UNIRS_CONFIG``), and environment variables prefixed ``UNIRS_``. Nested sections use a
double underscore: ``UNIRS_SMTP__HOST=mail.example.org``, ``UNIRS_POLL__LOOKBACK_DAYS=14``.

Settings are built once, at an entry point — the ``unirs-monitor`` command group (handed to its commands as
the click context object), the ``unirs-worker``/Celery app (``workers.celery_app.settings``), the demo and
Alembic's ``migrations/env.py`` — with :func:`get_settings`, and handed down as an argument from there
(stac-fastapi-pgstac style): nothing below an entry point reads the environment, so one process can run two
configurations (``tests/test_settings_scoping.py``). Tests that change the environment call
``get_settings.cache_clear()``.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as PydanticSettingsError


class CatalogueSettings(BaseModel):
    """One STAC API to poll."""

    name: str
    url: str
    collections: list[str] = ["sentinel-2-l2a"]
    # Asset hrefs are third-party URLs: only these schemes/hosts are ever opened.
    allowed_schemes: list[str] = ["https"]
    allowed_hosts: list[str] = []
    # Loopback/link-local/private addresses are refused unless a deployment opts in (tests, the demo).
    allow_private_hosts: bool = False
    # Logical band name -> asset key. None: the collection profile's map (eo/profiles.py: Earth Search,
    # Planetary Computer, Landsat C2 L2 ...), else eo:bands common names. Set, it applies to every
    # collection of this catalogue; `collection_asset_keys` overrides it per collection.
    asset_keys: dict[str, str] | None = None
    collection_asset_keys: dict[str, dict[str, str]] = {}
    # Collection -> profile name (eo.profiles.PROFILES, or "generic"); unset collections are detected
    # from the items (collection id plus tell-tale properties/assets).
    profiles: dict[str, str] = {}
    # "planetary-computer" signs hrefs right before reading (needs the `pc` extra).
    signing: Literal["none", "planetary-computer"] = "none"
    # Earth Search ignores CQL2 `filter` silently; the STACQL `query` extension works everywhere we poll.
    page_size: int = 200
    timeout_seconds: float = 30.0
    # How the late sweep finds items published long after sensing: "auto" probes whether the API filters
    # on the publication-time property `updated` (then `created`) and else re-reads by sensing time
    # ("deep"); "off" never sweeps this catalogue.
    late_sweep: Literal["auto", "updated", "created", "deep", "off"] = "auto"


class PollSettings(BaseModel):
    interval_minutes: float = 15.0
    # Catalogues publish late (days); each poll re-reads this far behind its last successful cursor.
    lookback_days: float = 10.0
    # Areas closer than this share one search (their hull is searched once).
    group_distance_km: float = 50.0
    max_retries: int = 5
    backoff_factor: float = 1.0
    # A 429/503 asking for a longer `Retry-After` waits only this long (then retries or fails the poll).
    max_retry_after_seconds: float = 60.0
    # The whole poll (every catalogue × collection) stops starting requests after this long; what was
    # not finished keeps its cursor and is re-read next cycle.
    deadline_seconds: float = 600.0
    # Searches of different groups of areas run in this many threads at once (each on its own HTTP session
    # and database connection): a poll waits mostly on the catalogue's answers.
    search_threads: int = Field(4, ge=1, le=8)
    # The late sweep (monitor/catalogues/late.py) runs at most this often, after a poll; 0 = never.
    late_sweep_hours: float = 6.0
    # It looks for items sensed up to this long ago (and more than the look-back ago): older publications
    # are archive reprocessing, the backfill command's business.
    late_sweep_days: float = 90.0


class AnalysisSettings(BaseModel):
    lease_seconds: int = 900
    heartbeat_seconds: int = 60
    max_attempts: int = 3
    dispatch_interval_seconds: float = 10.0
    # When the broker holds fewer messages than published `queued` rows (lost with a broker restart), rows
    # queued longer than this are re-sent at the next dispatch pass (without broker access: 2 × lease).
    queued_resend_seconds: float = 10.0
    # An observation whose computation was started this many times without storing an outcome (the task
    # raised, or its worker died) is settled `failed` and pairing moves on (core/observations.py).
    observation_max_attempts: int = Field(3, ge=1)
    # A task (observation or analysis) published again and again without any worker starting it — messages
    # lost before a worker took them, or a queue nobody consumes — is re-sent after a delay that doubles with
    # each such send (observations: 10 min, 20, 40 …; analyses: 2 × lease, 4 ×, …) up to this cap, never
    # failed for it: the work waits for a worker instead of being lost. `doctor` reports them.
    resend_backoff_max_seconds: float = Field(6 * 3600.0, gt=0)
    pixel_size_m: float = 10.0
    chip_size_m: float = 3840.0
    min_valid_fraction: float = 0.3
    cloud_buffer_px: int = 3
    min_mapping_unit_ha: float = 0.1
    # Chips whose spectral change score is below this never reach the model.
    model_score_threshold: float = 0.005
    video_frames: int = 8
    # GPU workers deployed (consuming the `gpu` queue). The scheduler asks for the UniRS model only when
    # this is > 0; the worker on the `gpu` queue decides what it runs from the weights it has loaded.
    gpu_workers: int = 0


class ModelSettings(BaseModel):
    # Directory of a UniRS checkpoint (llm/, vision_tower/, mm_projector/, config.json). None = spectral only.
    weights_path: Path | None = None
    # VILA-1.5-3B base checkpoint for the prompt-augmentation clue pass. None = no clues.
    base_weights_path: Path | None = None
    device: str | None = None
    max_new_tokens: int = 48


#: The From address of emails written to the outbox when no sender is configured (demo, local tries).
DEMO_SENDER = "UniRS Monitor <alerts@localhost>"


class SenderMissing(ValueError):
    """Emails would be sent through an SMTP host but no sender is configured."""


class SmtpSettings(BaseModel):
    # No host = write .eml files (and an HTML preview) to `outbox_dir` instead of sending.
    host: str | None = None
    port: int = 25
    starttls: bool = False
    ssl: bool = False
    username: str | None = None
    password: str | None = None
    # The From address. Required to send through `host`; the outbox (the demo, trying things out) falls
    # back to DEMO_SENDER. `unirs-monitor doctor` warns about an @localhost sender.
    sender: str | None = None
    timeout_seconds: float = 30.0
    max_attempts: int = 5
    outbox_dir: Path = Path("var/outbox")
    # Transient failures (4xx, refused, timeouts) wait base × 2^(attempt−1) seconds, capped: with the
    # defaults an outage of about 75 minutes is ridden out before a delivery is given up as failed.
    retry_base_seconds: float = 300.0
    retry_max_seconds: float = 3600.0
    # A delivery claimed for sending longer than this is assumed to belong to a dead worker.
    lease_seconds: int = 300

    def from_address(self) -> str:
        """The From header of every email: ``sender``, or :data:`DEMO_SENDER` for the outbox; raises
        :class:`SenderMissing` when emails would go to a mail server without a configured sender."""
        if self.sender:
            return self.sender
        if self.host:
            raise SenderMissing(f"smtp.sender (UNIRS_SMTP__SENDER) is not set: no email is sent through {self.host} "
                                "without a From address your mail server accepts; deliveries stay pending")
        return DEMO_SENDER


class ReportSettings(BaseModel):
    # Jinja2 templates of the emails; None = the `templates/` directory of the source tree.
    templates_dir: Path | None = None
    # Immediate alerts are created for analyses finished this recently (a newly added recipient or an
    # area switched to `immediate` does not receive the whole history).
    immediate_lookback_days: float = 7.0
    digest_interval_hours: float = 24.0
    # A digest ends this long before "now", so an analysis whose transaction is still committing is
    # not skipped by both this digest and the next one.
    digest_settle_minutes: float = 10.0
    # Analyses shown in full (images, answers) in a digest; the rest are listed in a table.
    digest_detailed_analyses: int = 5
    # Health warning when an area has had no clear scene for this long.
    no_clear_scene_days: float = 14.0


class WebSettings(BaseModel):
    """The web app and HTTP API (`unirs-monitor serve`, package web/)."""

    # Where users reach the app (behind a proxy: its external URL). Links in emails (analysis page,
    # unsubscribe, manage alerts) are built from it; None = emails carry no web links.
    public_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    # Signs session cookies and unsubscribe links; every replica needs the same value. None = a random
    # secret per process (fine for one replica; sessions and links then die with the process).
    secret: str | None = None
    # Leaflet tile URL template of the map pages' basemap, and the credit the tile provider requires.
    # "" (the default) = no basemap: the user's browser then asks no host but this app (demo, tests,
    # air-gapped sites). The shipped config/unirs.toml sets OpenStreetMap's tiles for production; the
    # Content-Security-Policy allows the template's host for images only (web/templating.py).
    basemap_url: str = ""
    basemap_attribution: str = ""
    session_hours: float = 12.0
    # Failed logins per e-mail address or client address within the window before 429 Too Many Requests.
    login_max_failures: int = 5
    login_window_minutes: float = 15.0


class WebhookSettings(BaseModel):
    """Delivery of signed alert events to the HTTPS endpoints of an area (Standard Webhooks)."""

    allowed_schemes: list[str] = ["https"]
    # Endpoint hosts must be public addresses; these hosts (exact, or ``*.example.org``) are exempt from
    # that rule (an intranet receiver; tests allow-list 127.0.0.1).
    allowed_private_hosts: list[str] = []
    # CA bundle (PEM) that endpoint certificates must chain to; None = the system's trust store.
    ca_file: Path | None = None
    timeout_seconds: float = 10.0
    # Failures (refused, timeouts, 5xx, 429) wait base × 2^(attempt−1) seconds, capped; 4xx other than
    # 408/429 give up at once. With the defaults a receiver may be down for about 4 hours.
    max_attempts: int = 8
    retry_base_seconds: float = 60.0
    retry_max_seconds: float = 3600.0
    # A claimed event older than this belongs to a dead sender and is sent again with the same webhook-id.
    lease_seconds: int = 120


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="UNIRS_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    database_url: str = "postgresql+psycopg://unirs:unirs@127.0.0.1:5432/unirs"
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    # None = INFO for long-running services (scheduler, workers, servers), WARNING for one-shot commands.
    log_level: str | None = None
    log_format: Literal["text", "json"] = "text"
    data_dir: Path = Path("var")
    # Areas larger than this are refused (a typo in a coordinate should not trigger a continent-wide poll).
    max_area_km2: float = 10_000.0
    # Areas with more vertices than this are refused (a 1 M-vertex polygon costs ~0.5 GB to validate and
    # slows every intersection query); simplify such boundaries first.
    max_area_vertices: int = 100_000
    public_url: str = "https://www.openstreetmap.org"
    catalogues: list[CatalogueSettings] = Field(
        default_factory=lambda: [
            CatalogueSettings(
                name="earth-search",
                url="https://earth-search.aws.element84.com/v1",
                collections=["sentinel-2-l2a"],
                allowed_hosts=["sentinel-cogs.s3.us-west-2.amazonaws.com", "earth-search.aws.element84.com"],
            )
        ]
    )
    poll: PollSettings = PollSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    model: ModelSettings = ModelSettings()
    smtp: SmtpSettings = SmtpSettings()
    reports: ReportSettings = ReportSettings()
    web: WebSettings = WebSettings()
    webhooks: WebhookSettings = WebhookSettings()
    # Queues this worker process consumes ("cpu", "gpu" or "cpu,gpu"); `unirs-worker --queues` sets it for the
    # Celery process it starts. A worker not consuming `gpu` never loads the model.
    worker_queues: str | None = None
    # Prometheus /metrics served by the scheduler when set (`unirs-monitor metrics` prints them once).
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("UNIRS_CONFIG")
        if toml_path:
            if not Path(toml_path).is_file():
                raise FileNotFoundError(f"UNIRS_CONFIG points to {toml_path!r}, which is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    def catalogue(self, name: str) -> CatalogueSettings:
        for cat in self.catalogues:
            if cat.name == name:
                return cat
        raise KeyError(f"no catalogue named {name!r} is configured (have: {[c.name for c in self.catalogues]})")


class ConfigError(ValueError):
    """Settings that cannot be loaded; the message is one line naming the variable (or TOML key) and the fix."""


def _env_name(loc: tuple[Any, ...]) -> str:
    """The ``UNIRS_*`` variable that sets ``loc`` (the longest prefix of it that is set, e.g. a JSON list)."""
    names = [str(part) for part in loc if not isinstance(part, int)]
    for n in range(len(names), 0, -1):
        candidate = "UNIRS_" + "__".join(names[:n]).upper()
        if candidate in os.environ:
            return candidate
    return ""


def _describe(loc: tuple[Any, ...], msg: str, value: Any) -> str:
    env = _env_name(loc)
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if env and env == "UNIRS_" + "__".join(str(p) for p in loc).upper():
        return f"{env}={value!r}: {msg}; fix or unset {env}"
    if env:
        return f"{env}: {path}={value!r}: {msg}; fix {env}"
    source = f" in {os.environ['UNIRS_CONFIG']}" if os.environ.get("UNIRS_CONFIG") else ""
    return f"setting {path}={value!r}{source}: {msg}; fix it or override with UNIRS_{'__'.join(map(str, loc)).upper()}"


def load_settings() -> Settings:
    """:class:`Settings` from the file and environment, or :class:`ConfigError` with one line per problem.

    Pydantic's own errors are a multi-line report naming model fields; an operator sets variables, so the
    message names the ``UNIRS_*`` variable (or the TOML key) and says what to do.
    """
    try:
        return Settings()
    except ValidationError as exc:
        problems = [
            _describe(e["loc"], "required" if e["type"] == "missing" else e["msg"],
                      None if e["type"] == "missing" else e.get("input"))
            for e in exc.errors()
        ]
        raise ConfigError("invalid configuration: " + " | ".join(problems)
                          + " (see the README's configuration reference)") from None
    except PydanticSettingsError as exc:
        # "error parsing value for field "catalogues" from source "EnvSettingsSource"": a JSON value that
        # does not parse; the cause says where.
        field_name = re.search(r'field "([^"]+)"', str(exc))
        env = "UNIRS_" + field_name.group(1).upper() if field_name else "a UNIRS_* variable"
        raise ConfigError(f"invalid configuration: {env} is not valid JSON ({exc.__cause__}); "
                          "complex settings (lists, objects) are JSON in the environment") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid configuration: {os.environ.get('UNIRS_CONFIG')} is not valid TOML: {exc}") from None
    except FileNotFoundError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process settings (cached); :class:`ConfigError` with a one-line message when they are invalid."""
    return load_settings()
