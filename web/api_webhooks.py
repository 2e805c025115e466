"""REST API of an area's webhook endpoints (signed alert events, :mod:`monitor.reports.webhooks`).

The endpoint's signing secret (``whsec_…``) is in the answer to the POST only. URLs go through the same
policy as asset hrefs (:func:`eo.security.check_webhook_url`); a refused URL answers 422 with the reason.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import Settings
from core.models import WebhookEndpoint
from monitor.reports import webhooks as svc
from web.deps import DB, Principal, owned_area, principal, settings_of

router = APIRouter(prefix="/api", tags=["webhooks"])


class NewWebhook(BaseModel):
    url: str = Field(..., max_length=2048, examples=["https://hooks.example.org/unirs"])
    description: str | None = Field(None, max_length=500)


@router.get("/areas/{area_id}/webhooks")
def list_webhooks(area_id: int, who: Principal = Depends(principal),
                  session: Session = DB) -> list[dict[str, Any]]:
    """The area's webhook endpoints (without their secrets)."""
    area = owned_area(session, who, area_id)
    rows = session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.area_id == area.id)
                           .order_by(WebhookEndpoint.id))
    return [svc.endpoint_view(e) for e in rows]


@router.post("/areas/{area_id}/webhooks", status_code=201)
def add_webhook(area_id: int, body: NewWebhook, who: Principal = Depends(principal), session: Session = DB,
                settings: Settings = Depends(settings_of)) -> dict[str, Any]:
    """Register an HTTPS endpoint: it receives one signed JSON event per alert of the area (Standard Webhooks;
    verify with the ``secret`` of this answer, which is not shown again)."""
    area = owned_area(session, who, area_id)
    try:
        endpoint = svc.add_endpoint(session, area, body.url, settings.webhooks, body.description)
    except svc.WebhookError as exc:
        raise HTTPException(422, str(exc)) from None
    session.commit()
    return svc.endpoint_view(endpoint, secret=True)


class WebhookChange(BaseModel):
    enabled: bool = Field(..., description="false: the endpoint's events are skipped (reason 'webhook disabled')")


@router.patch("/areas/{area_id}/webhooks/{webhook_id}")
def change_webhook(area_id: int, webhook_id: int, body: WebhookChange, who: Principal = Depends(principal),
                   session: Session = DB) -> dict[str, Any]:
    """Enable or disable an endpoint. A disabled one gets no requests; its events end ``skipped`` and are not
    sent when it is enabled again."""
    area = owned_area(session, who, area_id)
    endpoint = session.get(WebhookEndpoint, webhook_id)
    if endpoint is None or endpoint.area_id != area.id:
        raise HTTPException(404, f"no webhook {webhook_id} on area {area_id}")
    svc.set_enabled(session, endpoint, body.enabled)
    return svc.endpoint_view(endpoint)


@router.delete("/areas/{area_id}/webhooks/{webhook_id}", status_code=204, response_class=Response)
def remove_webhook(area_id: int, webhook_id: int, who: Principal = Depends(principal),
                   session: Session = DB) -> Response:
    area = owned_area(session, who, area_id)
    endpoint = session.get(WebhookEndpoint, webhook_id)
    if endpoint is None or endpoint.area_id != area.id:
        raise HTTPException(404, f"no webhook {webhook_id} on area {area_id}")
    session.delete(endpoint)
    return Response(status_code=204)
