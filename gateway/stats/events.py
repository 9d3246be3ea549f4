"""Audit explorer and event detail: filtered, keyset-paginated events and an event's place in the hash chain.

Service functions in the style of `gateway.services` (keyword-only, role-checked through `Principal.require`,
no FastAPI). Queries filter on indexed columns and page on the `seq` primary key with LIMIT (no OFFSET,
no COUNT over the whole log).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Text, cast, func, or_, select, text
from sqlalchemy.orm import Session

from audit.chain import Anchor, ChainReport, verify_fragments
from audit.checkpoints import checkpoint_record, verify_checkpoint_signature
from audit.export import event_record
from audit.models import AuditEvent, ChainCheckpoint, Job
from gateway.auth import Principal
from gateway.errors import InvalidRequest, NotFound
from gateway.stats.aggregates import DECISION_ACTIONS

# A page of the explorer filtered on payload content examines at most this many events.
SCAN_SPAN = 20_000
# Event detail verifies the stretch up to the covering checkpoint when it is at most this long.
MAX_SEGMENT = 5_000


# --- audit explorer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventFilters:
    """What the audit explorer narrows by; every field is optional."""

    since: datetime | None = None
    until: datetime | None = None
    team: str | None = None
    model: str | None = None
    action: str | None = None
    rule: str | None = None
    text: str | None = None

    @property
    def reads_payloads(self) -> bool:
        """True when matching needs each event's payload (no index helps), so scans are bounded."""
        return bool(self.model or self.rule or self.text)

    def conditions(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.since is not None:
            where.append(AuditEvent.ts >= self.since)
        if self.until is not None:
            where.append(AuditEvent.ts < self.until)
        if self.team:
            where.append(AuditEvent.team == self.team)
        if self.action:
            where.append(AuditEvent.action == self.action)
        if self.model:
            where.append(or_(Job.model == self.model,
                             AuditEvent.payload["model"].as_string() == self.model,
                             AuditEvent.payload["context"]["model"].as_string() == self.model))
        payload_text = cast(AuditEvent.payload, Text)
        if self.rule:
            # Payloads are stored as canonical JSON (audit.db.make_engine's serializer): compact, so a reason
            # reads {"rule_id":"<id>",...}. Only screenings name the rules that fired.
            where.append(AuditEvent.action.in_(DECISION_ACTIONS))
            where.append(payload_text.contains(f'"rule_id":{json.dumps(self.rule, ensure_ascii=False)}',
                                               autoescape=True))
        if self.text:
            needle = self.text.strip()
            where.append(or_(AuditEvent.id == needle, AuditEvent.job_id == needle,
                             AuditEvent.key_id == needle,
                             func.lower(payload_text).contains(needle.lower(), autoescape=True)))
        return where


@dataclass
class EventPage:
    """One page of events, newest first; `next_before` is the keyset cursor of the next (older) page.

    `searched` is the seq range examined when a filter had to read payloads (rule, model, text): such a
    page looks at most `scan_span` events, so a rare term costs several pages, never one slow one.
    """

    events: list[dict[str, Any]]
    next_before: int | None
    searched: tuple[int, int] | None = None


def search_events(*, session: Session, principal: Principal, filters: EventFilters, limit: int = 50,
                  before: int | None = None, scan_span: int = SCAN_SPAN) -> EventPage:
    """Audit events matching `filters`, newest first, keyset-paginated on `seq` (no OFFSET, no COUNT)."""
    principal.require("auditor")
    if not 1 <= limit <= 500:
        raise InvalidRequest(f"limit must be between 1 and 500, not {limit}")
    query = (select(AuditEvent, Job.model).outerjoin(Job, Job.id == AuditEvent.job_id)
             .where(*filters.conditions()))
    top = before if before is not None else (session.scalar(select(func.max(AuditEvent.seq))) or 0) + 1
    query = query.where(AuditEvent.seq < top)
    floor = None
    if filters.reads_payloads:
        floor = max(1, top - scan_span)
        query = query.where(AuditEvent.seq >= floor)
    rows = session.execute(query.order_by(AuditEvent.seq.desc()).limit(limit + 1)).all()
    events = [_event_row(event, model) for event, model in rows[:limit]]
    if len(rows) > limit:
        next_before: int | None = events[-1]["seq"]
    else:
        next_before = floor if floor is not None and floor > 1 else None
    searched = (floor, top - 1) if floor is not None and len(rows) <= limit else None
    return EventPage(events=events, next_before=next_before, searched=searched)


def _event_row(event: AuditEvent, job_model: str | None) -> dict[str, Any]:
    payload = event.payload or {}
    context: dict[str, Any] = payload["context"] if isinstance(payload.get("context"), dict) else {}
    return {"seq": event.seq, "id": event.id, "ts": event.ts, "action": event.action, "key_id": event.key_id,
            "team": event.team, "job_id": event.job_id,
            "model": job_model or payload.get("model") or context.get("model"),
            "outcome": payload.get("action") if event.action in DECISION_ACTIONS else None,
            "rules": fired_rules(payload)}


def fired_rules(payload: dict[str, Any]) -> list[str]:
    """Rule ids named by the reasons in a decision event's screenings, in order, without repeats."""
    seen: list[str] = []
    for screening in payload.get("screenings") or ():
        decision = screening.get("decision") if isinstance(screening, dict) else None
        for reason in (decision or {}).get("reasons") or ():
            rule = reason.get("rule_id") if isinstance(reason, dict) else None
            if rule and rule not in seen:
                seen.append(str(rule))
    return seen


def _distinct(session: Session, column: str) -> list[str]:
    """Distinct values of an indexed audit_events column by a loose index scan: one index probe per value,
    instead of reading every row (what SELECT DISTINCT does on PostgreSQL)."""
    assert column in ("action", "team")  # identifiers, not user input
    query = text(f"""
        WITH RECURSIVE v(value) AS (
            SELECT min({column}) FROM audit_events
            UNION ALL
            SELECT (SELECT min({column}) FROM audit_events WHERE {column} > v.value) FROM v WHERE v.value IS NOT NULL
        )
        SELECT value FROM v WHERE value IS NOT NULL""")
    return [str(value) for value in session.scalars(query)]


def event_actions(*, session: Session, principal: Principal) -> list[str]:
    """The distinct event actions present (for the explorer's action filter)."""
    principal.require("auditor")
    return _distinct(session, "action")


def event_teams(*, session: Session, principal: Principal) -> list[str]:
    """The distinct teams present in the audit log (for the explorer's team filter)."""
    principal.require("auditor")
    return _distinct(session, "team")


# --- event detail -----------------------------------------------------------------------------------


@dataclass
class ChainPosition:
    """Where an event sits in the hash chain and what could be verified about it here."""

    seq: int
    head_seq: int
    verified: ChainReport
    checkpoint: dict[str, Any] | None
    checkpoint_signature_ok: bool | None
    segment_checked: tuple[int, int]

    @property
    def state(self) -> str:
        """'broken', 'anchored' (links verified up to a signed checkpoint) or 'linked' (not yet anchored)."""
        if not self.verified.ok:
            return "broken"
        if self.checkpoint is not None and self.checkpoint_signature_ok and \
                self.segment_checked[1] >= int(self.checkpoint["seq"]):
            return "anchored"
        return "linked"

    @property
    def explanation(self) -> str:
        first, last = self.segment_checked
        if self.state == "broken":
            where = f" at seq {self.verified.first_bad_seq}" if self.verified.first_bad_seq else ""
            return f"chain BROKEN{where}: {self.verified.reason}"
        linked = f"hashes and links of seq {first}..{last} verified"
        if self.state == "anchored":
            assert self.checkpoint is not None
            return f"{linked}, up to the signed checkpoint at seq {self.checkpoint['seq']} (signature valid)"
        if self.checkpoint is None:
            return f"{linked}; no signed checkpoint covers this event yet"
        if not self.checkpoint_signature_ok:
            return f"{linked}; the checkpoint at seq {self.checkpoint['seq']} has an INVALID signature"
        return (f"{linked}; the signed checkpoint at seq {self.checkpoint['seq']} is more than {MAX_SEGMENT} "
                "events away: run the full chain verification to connect them")


@dataclass
class EventDetail:
    event: dict[str, Any]
    chain: ChainPosition
    job: Job | None
    related: list[dict[str, Any]]


def event_detail(*, session: Session, principal: Principal, event_id: str) -> EventDetail:
    """One event with its chain position, local verification, its job and the job's other events."""
    principal.require("auditor")
    event = session.scalar(select(AuditEvent).where(AuditEvent.id == event_id))
    if event is None:
        raise NotFound(f"no audit event {event_id}")
    head_seq = session.scalar(select(func.max(AuditEvent.seq))) or event.seq
    checkpoint_row = session.scalar(select(ChainCheckpoint).where(ChainCheckpoint.seq >= event.seq)
                                    .order_by(ChainCheckpoint.seq).limit(1))
    checkpoint = checkpoint_record(checkpoint_row) if checkpoint_row is not None else None
    signature_ok = verify_checkpoint_signature(checkpoint) is None if checkpoint is not None else None
    last = event.seq + 1
    anchors: list[Anchor] = []
    if checkpoint is not None and signature_ok and int(checkpoint["seq"]) - event.seq <= MAX_SEGMENT:
        last = int(checkpoint["seq"])
        anchors.append(Anchor(last, str(checkpoint["head_hash"]), f"checkpoint of {checkpoint['ts']}"))
    first = max(1, event.seq - 1)
    segment = session.execute(select(AuditEvent.__table__).where(AuditEvent.seq.between(first, last))
                              .order_by(AuditEvent.seq)).mappings()
    report = verify_fragments((event_record(row) for row in segment), anchors)
    job = session.get(Job, event.job_id) if event.job_id else None
    related: list[dict[str, Any]] = []
    if event.job_id:
        related = [{"seq": e.seq, "id": e.id, "ts": e.ts, "action": e.action}
                   for e in session.scalars(select(AuditEvent).where(AuditEvent.job_id == event.job_id)
                                            .order_by(AuditEvent.seq).limit(200))]
    position = ChainPosition(seq=event.seq, head_seq=head_seq, verified=report, checkpoint=checkpoint,
                             checkpoint_signature_ok=signature_ok,
                             segment_checked=(first, min(last, head_seq)))
    return EventDetail(event=_event_public(event), chain=position, job=job, related=related)


def _event_public(event: AuditEvent) -> dict[str, Any]:
    return {"seq": event.seq, "id": event.id, "ts": event.ts, "action": event.action,
            "key_id": event.key_id, "team": event.team, "job_id": event.job_id, "payload": event.payload,
            "prev_hash": event.prev_hash, "hash": event.hash}

