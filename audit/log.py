"""The only writer of the audit chain: `append_many` and `append_event`, serialised on the chain head row."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, event, insert, select, update
from sqlalchemy.orm import Session, SessionTransaction, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from audit.chain import CanonicalText, body_bytes, canonical_json, format_ts
from audit.models import AuditEvent, ChainHead

HEAD_ROW_ID = 1
_HEAD_KEY = "audit.locked_chain_head"
_DEFERRED_KEY = "audit.deferred_events"
_EVENTS = cast(Table, AuditEvent.__table__)
# The string encoder json.dumps uses with ensure_ascii=False (the C one when available).
_encode_str: Callable[[str], str] = json.encoder.encode_basestring


_LOCK_HEAD = select(ChainHead.seq, ChainHead.hash).where(ChainHead.id == HEAD_ROW_ID).with_for_update()
_NO_HEAD = "the chain_head row is missing: run `llamagen-gateway migrate` on this database"


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


def _held_head(session: Session) -> ChainHead | None:
    """The head this session's root transaction has locked already, or None."""
    held = session.info.get(_HEAD_KEY)
    if held is None:
        return None
    transaction_ref, locked = held
    root = session.get_transaction()
    if root is not None and transaction_ref() is root and root.is_active and locked in session:
        return cast(ChainHead, locked)
    return None


def _remember_lock(session: Session, head: ChainHead) -> None:
    """Record that the root transaction holds the head lock (a lock taken inside a savepoint is released if
    the savepoint rolls back: only root locks are remembered)."""
    root = session.get_transaction()
    if root is not None and session.get_nested_transaction() is None:
        session.info[_HEAD_KEY] = (weakref.ref(root), head)
    else:
        session.info.pop(_HEAD_KEY, None)


def lock_chain_head(session: Session) -> ChainHead:
    """Lock the chain head for the rest of the caller's transaction and return it.

    PostgreSQL: SELECT ... FOR UPDATE on the single head row. SQLite has no row locks: a no-op UPDATE of
    the head row first takes the database write lock (pysqlite begins the transaction before DML), so the
    read that follows cannot race another writer. Once locked, later appends in the same transaction reuse
    the head without a round trip, also inside savepoints: a savepoint that rolls back expires the head
    object it changed, so the next read reloads the root transaction's head, which is still locked.
    """
    held = _held_head(session)
    if held is not None:
        return held
    if session.autoflush:
        session.flush()  # pending changes (a head moved in a savepoint) are written before the head is read
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        connection.execute(update(ChainHead).where(ChainHead.id == HEAD_ROW_ID).values(seq=ChainHead.seq))
    # A Core query, and the head object set from its row: loading it through the ORM cost twice the CPU.
    found = connection.execute(_LOCK_HEAD).one_or_none()
    if found is None:
        raise AuditLogError(_NO_HEAD)
    seq, hash_ = found
    known = _HEAD_GUESSES.get(connection.engine)
    _HEAD_GUESSES[connection.engine] = (seq, hash_, known is None or known[:2] == (seq, hash_))
    return _hold_head(session, seq, hash_)


# Events go to PostgreSQL as one parameter (the rows as a JSON array), however many rows: executemany would
# run one INSERT per row on the server while the head is locked, and array parameters are slow to encode.
# Each payload travels as a JSON string holding its canonical text, stored verbatim by the cast.
_PG_INSERT = (
    "INSERT INTO audit_events (seq, id, ts, action, key_id, team, job_id, payload, prev_hash, hash) "
    "SELECT seq, id, ts, action, key_id, team, job_id, payload::json, prev_hash, hash "
    "FROM json_to_recordset(%(rows)s::json) AS rows (seq bigint, id text, ts timestamptz, action text, "
    "key_id text, team text, job_id text, payload text, prev_hash text, hash text)"
)
# With the head locked already: the same statement moves the head row (one round trip fewer under the lock).
_PG_INSERT_MOVING_HEAD = (
    f"WITH inserted AS ({_PG_INSERT}) UPDATE chain_head SET seq = %(head_seq)s, hash = %(head_hash)s "
    f"WHERE id = {HEAD_ROW_ID}"
)
# Without it: lock the head, and only if it is the one the events were chained on, move it and insert them;
# either way return the head as locked. One round trip instead of two when the guess is right. While another
# transaction holds the lock this waits, then reads the head that transaction committed (READ COMMITTED
# re-reads a row it waited for), so a stale guess inserts nothing; the seq primary key would refuse a fork.
_PG_APPEND_IF_HEAD = (
    f"WITH head AS (SELECT seq, hash FROM chain_head WHERE id = {HEAD_ROW_ID} FOR UPDATE), "
    "moved AS (UPDATE chain_head SET seq = %(head_seq)s, hash = %(head_hash)s FROM head "
    f"WHERE chain_head.id = {HEAD_ROW_ID} AND head.seq = %(after_seq)s AND head.hash = %(after_hash)s "
    "RETURNING chain_head.seq), "
    f"inserted AS ({_PG_INSERT} WHERE EXISTS (SELECT FROM moved)) "
    "SELECT seq, hash FROM head"
)

# The head each engine last saw (read under the lock or moved by an append), and whether the engine was alone:
# the head was where it had left it. Alone, an append on PostgreSQL chains its events on that head before it
# holds the lock (one round trip); the guess is checked under the lock, and a wrong one costs the chaining
# and the round trip it tried to save. While other writers append too the guess would always be wrong: the
# head is locked first.
_HEAD_GUESSES: weakref.WeakKeyDictionary[Engine, tuple[int, str, bool]] = weakref.WeakKeyDictionary()


def _random_uuids(n: int) -> list[str]:
    """`n` random (version 4) UUIDs as `str(uuid.uuid4())` writes them, from one urandom call (uuid4() builds
    a UUID object per id: half the cost of chaining an event)."""
    raw = os.urandom(16 * n)
    ids = []
    for i in range(0, 16 * n, 16):
        value = int.from_bytes(raw[i:i + 16]) & ~(0xF000 << 64 | 0xC000 << 48) | (0x4000 << 64 | 0x8000 << 48)
        hex_ = f"{value:032x}"
        ids.append(f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}")
    return ids


def _link(prepared: Sequence[PreparedEvent], seq: int, prev_hash: str) -> list[ChainedEvent]:
    """Number, timestamp and hash events after the head (seq, prev_hash)."""
    # One instant for the events of one call (they commit together); microseconds are what every backend
    # stores, and the hash covers exactly that.
    ts = datetime.now(UTC)
    ts_text = format_ts(ts)
    events: list[ChainedEvent] = []
    new_ids = iter(_random_uuids(sum(1 for item in prepared if not item.event.event_id)))
    for item in prepared:
        event = item.event
        seq += 1
        event_id = event.event_id or next(new_ids)
        body = body_bytes(seq=seq, id=event_id, ts=ts_text, action=event.action, key_id=event.key_id,
                          team=event.team, job_id=event.job_id, payload_json=item.payload_json)
        digest = hashlib.sha256(prev_hash.encode("ascii") + b"\n" + body).hexdigest()
        events.append(ChainedEvent(seq, event_id, ts, event.action, event.key_id, event.team, event.job_id,
                                   item.payload_json, prev_hash, digest))
        prev_hash = digest
    return events


def _pg_rows(events: list[ChainedEvent]) -> str:
    """The events as the JSON array `_PG_INSERT` reads, written directly (every field is a string or int)."""
    # The events of one `_link` call share a timestamp; deferred ones come from several calls.
    ts_texts = {ts: format_ts(ts) for ts in {e.ts for e in events}}
    return "[" + ",".join(
        f'{{"seq":{e.seq},"id":{_encode_str(e.id)},"ts":"{ts_texts[e.ts]}","action":{_encode_str(e.action)},'
        f'"key_id":{_encode_str(e.key_id)},"team":{_encode_str(e.team)},'
        f'"job_id":{"null" if e.job_id is None else _encode_str(e.job_id)},'
        f'"payload":{_encode_str(e.payload_json)},"prev_hash":"{e.prev_hash}","hash":"{e.hash}"}}'
        for e in events
    ) + "]"


@functools.cache
def _head_identity() -> Any:
    """The head row's identity-map key (computing it inspects the mapper each time: worth keeping)."""
    return Session.identity_key(ChainHead, HEAD_ROW_ID)


def _hold_head(session: Session, seq: int, hash_: str) -> ChainHead:
    """The session's head object, set to the head the root transaction has just locked (no query)."""
    head = cast(ChainHead | None, session.identity_map.get(_head_identity()))
    if head is None:
        head = ChainHead(id=HEAD_ROW_ID, seq=seq, hash=hash_)
        make_transient_to_detached(head)
        session.add(head)
    set_committed_value(head, "seq", seq)
    set_committed_value(head, "hash", hash_)
    _remember_lock(session, head)
    return head


def _append_on_guess(session: Session, connection: Connection, prepared: Sequence[PreparedEvent]
                     ) -> list[ChainedEvent] | None:
    """PostgreSQL, root transaction, head not yet locked: chain on the engine's guess and lock, check, move
    and insert with one statement. Returns the events, or None with the head locked and the guess corrected."""
    known = _HEAD_GUESSES.get(connection.engine)
    if known is None or not known[2]:
        return None
    guess = known[:2]
    if session.autoflush:
        session.flush()  # as the head query would: pending rows are written before the lock is taken
    events = _link(prepared, *guess)
    last = events[-1]
    found = connection.exec_driver_sql(_PG_APPEND_IF_HEAD, {
        "rows": _pg_rows(events), "after_seq": guess[0], "after_hash": guess[1],
        "head_seq": last.seq, "head_hash": last.hash,
    }).one_or_none()
    if found is None:
        raise AuditLogError(_NO_HEAD)
    if (found[0], found[1]) != guess:
        _HEAD_GUESSES[connection.engine] = (found[0], found[1], False)
        _hold_head(session, found[0], found[1])
        return None
    _HEAD_GUESSES[connection.engine] = (last.seq, last.hash, True)
    _hold_head(session, last.seq, last.hash)
    return events


def _insert_locked(session: Session, connection: Connection, head: ChainHead, events: list[ChainedEvent]) -> None:
    """Insert events chained on the locked head with one statement and move the head to the last.

    On the connection, not the session: no autoflush. On PostgreSQL outside savepoints the statement
    moves the head row too, recorded as the head's committed state (so the ORM sends no UPDATE; a
    rollback expires it). Elsewhere the head object is changed and flushed with the transaction (inside
    a savepoint that way a rollback of the savepoint expires the head it moved).
    """
    last = events[-1]
    if connection.dialect.name != "postgresql":
        connection.execute(insert(_EVENTS), [
            {"seq": e.seq, "id": e.id, "ts": e.ts, "action": e.action, "key_id": e.key_id, "team": e.team,
             "job_id": e.job_id, "payload": CanonicalText(e.payload_json),  # stored as exactly the text hashed
             "prev_hash": e.prev_hash, "hash": e.hash}
            for e in events
        ])
    elif session.get_nested_transaction() is None:
        connection.exec_driver_sql(_PG_INSERT_MOVING_HEAD, {"rows": _pg_rows(events), "head_seq": last.seq,
                                                            "head_hash": last.hash})
        set_committed_value(head, "seq", last.seq)
        set_committed_value(head, "hash", last.hash)
        known = _HEAD_GUESSES.get(connection.engine)
        _HEAD_GUESSES[connection.engine] = (last.seq, last.hash, known is None or known[2])
        return
    else:
        connection.exec_driver_sql(_PG_INSERT, {"rows": _pg_rows(events)})
    head.seq, head.hash = last.seq, last.hash


@dataclass(slots=True)
class _Deferred:
    """Events chained in memory on the locked head, inserted later with one statement (`insert_deferred`).

    `marks` holds, for each savepoint that appended, how many events were chained when it began: a savepoint
    that rolls back drops the events from its mark on, and the chain goes on from the event before them.
    """

    head: ChainHead
    base_seq: int
    base_hash: str
    events: list[ChainedEvent]
    marks: dict[SessionTransaction, int]


def defer_appends(session: Session) -> None:
    """Until `insert_deferred`, appends in this session's transaction are chained in memory, not inserted.

    The head is locked first (the chain grows from it, and nothing else can move it). Appends return their
    events as they will be stored; a savepoint that rolls back drops the events appended inside it, so the
    next append chains on the last event kept. For a group commit's units of work: each unit's savepoint
    then covers only its row changes, and the batch's events go in with one statement at its end.
    """
    head = lock_chain_head(session)
    session.info[_DEFERRED_KEY] = _Deferred(head, head.seq, head.hash, [], {})
    if not event.contains(session, "after_soft_rollback", _drop_rolled_back):
        event.listen(session, "after_soft_rollback", _drop_rolled_back)


def _drop_rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    """A savepoint rolled back: forget the deferred events appended inside it."""
    deferred = cast(_Deferred | None, session.info.get(_DEFERRED_KEY))
    if deferred is None:
        return
    mark = deferred.marks.pop(previous_transaction, None)
    if mark is None:
        return
    del deferred.events[mark:]
    last = deferred.events[-1] if deferred.events else None
    seq, hash_ = (last.seq, last.hash) if last else (deferred.base_seq, deferred.base_hash)
    set_committed_value(deferred.head, "seq", seq)
    set_committed_value(deferred.head, "hash", hash_)


def _append_deferred(session: Session, deferred: _Deferred, prepared: Sequence[PreparedEvent]
                     ) -> list[ChainedEvent]:
    head = deferred.head
    events = _link(prepared, head.seq, head.hash)
    transaction = session.get_nested_transaction()
    while transaction is not None and transaction.nested:  # this savepoint and those around it
        deferred.marks.setdefault(transaction, len(deferred.events))
        transaction = transaction.parent
    deferred.events += events
    set_committed_value(head, "seq", events[-1].seq)  # a unit that reads the head sees its own appends
    set_committed_value(head, "hash", events[-1].hash)
    return events


def insert_deferred(session: Session) -> int:
    """Insert the events deferred since `defer_appends` with one statement, move the head to the last of
    them, and end the deferral. Call it in the root transaction (not in a savepoint); returns the count."""
    deferred = cast(_Deferred | None, session.info.pop(_DEFERRED_KEY, None))
    if deferred is None or not deferred.events:
        return 0
    head, events = deferred.head, deferred.events
    set_committed_value(head, "seq", deferred.base_seq)  # the head as stored, until the insert moves it
    set_committed_value(head, "hash", deferred.base_hash)
    _insert_locked(session, session.connection(), head, events)
    return len(events)


def append_prepared(session: Session, prepared: Sequence[PreparedEvent]) -> list[ChainedEvent]:
    """Chain prepared events after the head and insert them with one statement (see `append_many`)."""
    if not prepared:
        return []
    deferred = session.info.get(_DEFERRED_KEY)
    if deferred is not None:
        return _append_deferred(session, deferred, prepared)
    connection = session.connection()
    if (connection.dialect.name == "postgresql" and session.get_nested_transaction() is None
            and _held_head(session) is None):
        events = _append_on_guess(session, connection, prepared)
        if events is not None:
            return events
    head = lock_chain_head(session)
    events = _link(prepared, head.seq, head.hash)
    _insert_locked(session, connection, head, events)
    return events


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
