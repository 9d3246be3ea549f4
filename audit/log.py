"""The only writer of the audit chain: `append_many` and `append_event`, serialised on the chain head row."""

from __future__ import annotations

import hashlib
import json
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from audit.chain import CanonicalText, body_bytes, canonical_json, format_ts
from audit.models import AuditEvent, ChainHead

HEAD_ROW_ID = 1
_HEAD_KEY = "audit.locked_chain_head"
_EVENTS = cast(Table, AuditEvent.__table__)


class AuditLogError(Exception):
    """The audit log cannot accept an event (missing chain head, bad payload)."""


@dataclass(frozen=True)
class NewEvent:
    """An event to append: everything but its place in the chain (seq, ts, prev_hash, hash)."""

    action: str
    key_id: str
    team: str
    payload: Mapping[str, Any]
    job_id: str | None = None
    event_id: str | None = None


@dataclass(slots=True)
class ChainedEvent:
    """An appended event as stored: its place in the chain and the fields its hash covers.

    A plain record, not an ORM object (building one per event cost more than hashing and inserting it);
    load `AuditEvent` rows for anything that needs the session.
    """

    seq: int
    id: str
    ts: datetime
    action: str
    key_id: str
    team: str
    job_id: str | None
    payload_json: str  # canonical JSON, exactly as stored and hashed
    prev_hash: str
    hash: str

    @property
    def payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.payload_json)
        return payload

    def body(self) -> dict[str, Any]:
        """The hashed part of the event (as `AuditEvent.body`)."""
        return {"seq": self.seq, "id": self.id, "ts": self.ts, "action": self.action, "key_id": self.key_id,
                "team": self.team, "job_id": self.job_id, "payload": self.payload}


@dataclass(frozen=True)
class PreparedEvent:
    """A checked event with its payload already as canonical JSON text (what is hashed and stored)."""

    event: NewEvent
    payload_json: str


def prepare(event: NewEvent) -> PreparedEvent:
    """Check an event and encode its payload; raises before anything touches the database."""
    if not event.action:
        raise AuditLogError("an audit event needs an action")
    return PreparedEvent(event, canonical_json(dict(event.payload)))


def lock_chain_head(session: Session) -> ChainHead:
    """Lock the chain head for the rest of the caller's transaction and return it.

    PostgreSQL: SELECT ... FOR UPDATE on the single head row. SQLite has no row locks: a no-op UPDATE of
    the head row first takes the database write lock (pysqlite begins the transaction before DML), so the
    read that follows cannot race another writer. Once locked, later appends in the same transaction reuse
    the head without a round trip, also inside savepoints: a savepoint that rolls back expires the head
    object it changed, so the next read reloads the root transaction's head, which is still locked.
    """
    held = session.info.get(_HEAD_KEY)
    if held is not None:
        transaction_ref, locked = held
        root = session.get_transaction()
        if root is not None and transaction_ref() is root and root.is_active and locked in session:
            return cast(ChainHead, locked)
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(ChainHead).where(ChainHead.id == HEAD_ROW_ID).values(seq=ChainHead.seq))
    query = select(ChainHead).where(ChainHead.id == HEAD_ROW_ID).with_for_update()
    head = session.scalars(query.execution_options(populate_existing=True)).one_or_none()
    if head is None:
        raise AuditLogError("the chain_head row is missing: run `llamagen-gateway migrate` on this database")
    root = session.get_transaction()
    if root is not None and session.get_nested_transaction() is None:
        # A lock taken inside a savepoint is released if the savepoint rolls back: only remember root locks.
        session.info[_HEAD_KEY] = (weakref.ref(root), head)
    else:
        session.info.pop(_HEAD_KEY, None)
    return head


# PostgreSQL: one statement and one parameter (the rows as a JSON array), however many rows: executemany
# would run one INSERT per row on the server while the head is locked, and array parameters are slow to
# encode. Each payload travels as a JSON string holding its canonical text, stored verbatim by the cast.
# The same statement moves the head row: one round trip fewer while the head is locked.
_PG_INSERT = (
    "INSERT INTO audit_events (seq, id, ts, action, key_id, team, job_id, payload, prev_hash, hash) "
    "SELECT seq, id, ts, action, key_id, team, job_id, payload::json, prev_hash, hash "
    "FROM json_to_recordset(%(rows)s::json) AS rows (seq bigint, id text, ts timestamptz, action text, "
    "key_id text, team text, job_id text, payload text, prev_hash text, hash text)"
)
_PG_INSERT_MOVING_HEAD = (
    f"WITH inserted AS ({_PG_INSERT}) UPDATE chain_head SET seq = %(head_seq)s, hash = %(head_hash)s "
    f"WHERE id = {HEAD_ROW_ID}"
)


def _insert_rows(session: Session, head: ChainHead, rows: list[dict[str, Any]], ts_text: str) -> None:
    """Insert event rows with one statement on the session's connection and move the head to the last.

    On the connection, not the session: no autoflush. On PostgreSQL outside savepoints the statement
    moves the head row too, recorded as the head's committed state (so the ORM sends no UPDATE; a
    rollback expires it). Elsewhere the head object is changed and flushed with the transaction (inside
    a savepoint that way a rollback of the savepoint expires the head it moved).
    """
    connection = session.connection()
    last = rows[-1]
    if connection.dialect.name != "postgresql":
        connection.execute(insert(_EVENTS), rows)
    else:
        document = json.dumps([{**row, "ts": ts_text} for row in rows], ensure_ascii=False)
        if session.get_nested_transaction() is None:
            connection.exec_driver_sql(_PG_INSERT_MOVING_HEAD, {"rows": document, "head_seq": last["seq"],
                                                                "head_hash": last["hash"]})
            set_committed_value(head, "seq", last["seq"])
            set_committed_value(head, "hash", last["hash"])
            return
        connection.exec_driver_sql(_PG_INSERT, {"rows": document})
    head.seq, head.hash = last["seq"], last["hash"]


def append_prepared(session: Session, prepared: Sequence[PreparedEvent]) -> list[ChainedEvent]:
    """Chain prepared events after the head and insert them with one statement (see `append_many`)."""
    if not prepared:
        return []
    head = lock_chain_head(session)
    seq, prev_hash = head.seq, head.hash
    # One instant for the events of one call (they commit together); microseconds are what every backend
    # stores, and the hash covers exactly that.
    ts = datetime.now(UTC)
    ts_text = format_ts(ts)
    rows: list[dict[str, Any]] = []
    for item in prepared:
        event = item.event
        seq += 1
        event_id = event.event_id or str(uuid.uuid4())
        body = body_bytes(seq=seq, id=event_id, ts=ts_text, action=event.action, key_id=event.key_id,
                          team=event.team, job_id=event.job_id, payload_json=item.payload_json)
        digest = hashlib.sha256(prev_hash.encode("ascii") + b"\n" + body).hexdigest()
        rows.append({"seq": seq, "id": event_id, "ts": ts, "action": event.action, "key_id": event.key_id,
                     "team": event.team, "job_id": event.job_id,
                     "payload": CanonicalText(item.payload_json),  # stored as exactly the text hashed
                     "prev_hash": prev_hash, "hash": digest})
        prev_hash = digest
    _insert_rows(session, head, rows, ts_text)
    return [
        ChainedEvent(row["seq"], row["id"], ts, row["action"], row["key_id"], row["team"], row["job_id"],
                     item.payload_json, row["prev_hash"], row["hash"])
        for row, item in zip(rows, prepared, strict=True)
    ]


def append_many(session: Session, events: Sequence[NewEvent]) -> list[ChainedEvent]:
    """Append events, in order, to the chain inside the caller's transaction (the caller commits).

    Every event is checked and encoded first; then the head is locked (once per transaction) and the
    events are inserted with one statement. The head stays locked until the caller's commit, so
    concurrent writers queue instead of forking the chain. Returns the events as stored (payloads after
    the canonical JSON round trip) as `ChainedEvent` records.
    """
    return append_prepared(session, [prepare(event) for event in events])


def append_event(
    session: Session,
    *,
    action: str,
    key_id: str,
    team: str,
    job_id: str | None = None,
    payload: Mapping[str, Any],
    event_id: str | None = None,
) -> ChainedEvent:
    """Append one event to the chain inside the caller's transaction (the caller commits); a request that
    writes several events together should use `append_many` (one INSERT for all of them)."""
    new = NewEvent(action=action, key_id=key_id, team=team, job_id=job_id, payload=payload, event_id=event_id)
    return append_many(session, [new])[0]
