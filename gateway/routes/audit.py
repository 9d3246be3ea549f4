"""Audit log: filtered events, streamed export and hash-chain verification."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from gateway import services
from gateway.deps import CallerDep, SessionDep, StateDep
from gateway.routes.generations import ERRORS
from gateway.schemas import MAX_OFFSET, Page, UTCTimestamp

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("/events", response_model=Page[dict[str, Any]], responses=ERRORS, summary="Filterable audit events")
def list_events(session: SessionDep, caller: CallerDep,
                action: Annotated[str | None, Query(max_length=64)] = None,
                team: Annotated[str | None, Query(max_length=64)] = None,
                job_id: Annotated[str | None, Query(max_length=64)] = None,
                since: UTCTimestamp | None = None, until: UTCTimestamp | None = None,
                limit: Annotated[int, Query(ge=1, le=500)] = 100,
                offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Page[dict[str, Any]]:
    rows, total = services.list_events(session=session, principal=caller, action=action, team=team,
                                       job_id=job_id, since=since, until=until, limit=limit, offset=offset)
    return Page[dict[str, Any]](data=rows, count=total)


@router.get("/export", responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}, **ERRORS},
            response_class=StreamingResponse, summary="Stream the audit log as JSONL or CSV")
def export(state: StateDep, caller: CallerDep, format: Literal["jsonl", "csv"] = "jsonl",
           action: Annotated[str | None, Query(max_length=64)] = None,
           team: Annotated[str | None, Query(max_length=64)] = None,
           since: UTCTimestamp | None = None, until: UTCTimestamp | None = None) -> StreamingResponse:
    chunks = services.export_events(state=state, principal=caller, fmt=format, action=action, team=team,
                                    since=since, until=until)
    media = "application/x-ndjson" if format == "jsonl" else "text/csv"
    return StreamingResponse(chunks, media_type=media,
                             headers={"Content-Disposition": f'attachment; filename="audit.{format}"'})


@router.get("/verify", response_model=dict[str, Any], responses=ERRORS, summary="Verify the hash chain")
def verify(state: StateDep, session: SessionDep, caller: CallerDep) -> dict[str, Any]:
    return services.verify_audit(state=state, session=session, principal=caller)
