"""The compliance dashboard: server-rendered pages over the same service functions as the JSON API."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.dashboard import governance_views, views
from gateway.dashboard.web import PREFIX, STATIC_DIR

router = APIRouter()
router.include_router(views.router)
router.include_router(governance_views.router)

STATIC_PATH = f"{PREFIX}/static"

__all__ = ["STATIC_DIR", "STATIC_PATH", "router"]
