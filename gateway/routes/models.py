"""GET /v1/models and /v1/models/{name}: model cards with lineage."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway import services
from gateway.deps import CallerDep, StateDep
from gateway.routes.generations import ERRORS
from gateway.schemas import Page

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=Page[dict[str, Any]], responses=ERRORS, summary="Model cards")
def list_models(state: StateDep, caller: CallerDep) -> Page[dict[str, Any]]:
    cards = services.list_models(state=state)
    return Page[dict[str, Any]](data=cards, count=len(cards))


@router.get("/{name}", response_model=dict[str, Any], responses=ERRORS, summary="One model card")
def get_model(name: str, state: StateDep, caller: CallerDep) -> dict[str, Any]:
    return services.get_model(state=state, name=name)
