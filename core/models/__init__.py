"""SQLAlchemy models: the whole state of the service lives in these tables.

Work items (:class:`Analysis`, :class:`Delivery`) carry explicit statuses; queues only carry their ids.
Every write that could be repeated is guarded by a UNIQUE key (scene acquisition key, analysis
idempotency key, delivery key + recipient), so retries and duplicate messages are harmless.

The first Alembic revision (``migrations/versions/0001_initial.py``) creates exactly these tables; any
change here needs a matching revision.

The tables are grouped in sibling modules (:mod:`core.models.accounts`, :mod:`.catalogue`, :mod:`.analysis`,
:mod:`.delivery`; the base and enums in :mod:`.base`); import them from here: ``from core.models import Area``.
"""

from core.models.accounts import ApiToken, Area, LoginFailure, Unsubscribe, User, WebhookEndpoint
from core.models.analysis import Analysis, Finding, FindingImage, Observation
from core.models.base import (
    DEFAULT_ALERT_CLASSES,
    OPERATOR_EMAIL,
    AlertFrequency,
    AnalysisStatus,
    AreaStatus,
    Base,
    DeliveryStatus,
    ObservationStatus,
    PairingPolicy,
)
from core.models.catalogue import Acquisition, Catalogue, PollState, QuarantinedItem, Scene
from core.models.delivery import Delivery, Digest

__all__ = [
    "DEFAULT_ALERT_CLASSES",
    "OPERATOR_EMAIL",
    "Acquisition",
    "AlertFrequency",
    "Analysis",
    "AnalysisStatus",
    "ApiToken",
    "Area",
    "AreaStatus",
    "Base",
    "Catalogue",
    "Delivery",
    "DeliveryStatus",
    "Digest",
    "Finding",
    "FindingImage",
    "LoginFailure",
    "Observation",
    "ObservationStatus",
    "PairingPolicy",
    "PollState",
    "QuarantinedItem",
    "Scene",
    "Unsubscribe",
    "User",
    "WebhookEndpoint",
]
