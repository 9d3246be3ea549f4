"""audit/log.py: the only writer; appends are numbered, linked and serialised across processes."""

from __future__ import annotations

import multiprocessing
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from audit.chain import GENESIS_HASH, canonical_json, event_hash
from audit.db import make_engine, make_session_factory
from audit.log import AuditLogError, NewEvent, append_event, append_many
from audit.models import AuditEvent, ChainHead
from audit.verify import verify_database


def append(sessions: sessionmaker[Session], n: int = 1, **overrides: Any) -> list[AuditEvent]:
    events = []
    with sessions() as session, session.begin():
        for i in range(n):
            fields: dict[str, Any] = {
                "action": "generation.requested",
                "key_id": "key-1",
                "team": "ads",
                "payload": {"seed": i},
            }
            fields.update(overrides)
            events.append(append_event(session, **fields))
    return events


def writer(url: str, worker: int, count: int, per_commit: int) -> None:
    """A separate process appending `count` events, `per_commit` per transaction."""
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    for first in range(0, count, per_commit):
        with sessions() as session, session.begin():
            for i in range(first, first + per_commit):
                payload = {"worker": worker, "i": i}
                append_event(session, action="load.append", key_id=f"worker-{worker}", team="load", payload=payload)
    engine.dispose()


def run_writers(url: str, processes: int, count: int, per_commit: int = 1) -> None:
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=writer, args=(url, w, count, per_commit)) for w in range(processes)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0] * processes


def test_append_event_numbers_events_from_one_and_links_them_from_genesis(session_factory: Any) -> None:
    first, second = append(session_factory, 2)
    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS_HASH and second.prev_hash == first.hash


def test_append_event_hash_covers_the_stored_body(session_factory: Any) -> None:
    (event,) = append(session_factory, job_id="job-1", payload={"scores": {"nsfw": 0.25}})
    with session_factory() as session:
        stored = session.scalars(select(AuditEvent)).one()
        assert stored.hash == event_hash(stored.prev_hash, stored.body()) == event.hash


def test_append_event_moves_the_chain_head(session_factory: Any) -> None:
    (_, last) = append(session_factory, 2)
    with session_factory() as session:
        head = session.get(ChainHead, 1)
        assert head is not None and (head.seq, head.hash) == (2, last.hash)


def test_append_event_uses_the_given_event_id(session_factory: Any) -> None:
    (event,) = append(session_factory, event_id="6f1c7c2e-0000-4000-8000-000000000001")
    assert event.id == "6f1c7c2e-0000-4000-8000-000000000001"


def test_append_event_stores_the_payload_as_canonical_json_reads_it_back(session_factory: Any) -> None:
    (event,) = append(session_factory, payload={"ratio": 0.5, "nested": {"b": 1, "a": [1, 2]}})
    assert event.payload == {"ratio": 0.5, "nested": {"a": [1, 2], "b": 1}}


def test_append_event_stores_the_payload_text_exactly_as_hashed(session_factory: Any) -> None:
    append(session_factory, payload={"z": 1, "a": {"y": 0.25, "b": "é"}})
    with session_factory() as session:
        stored = session.scalar(text("SELECT payload FROM audit_events"))
    assert stored == canonical_json({"z": 1, "a": {"y": 0.25, "b": "é"}})


def test_append_event_timestamps_are_utc_with_microseconds(session_factory: Any) -> None:
    (event,) = append(session_factory)
    with session_factory() as session:
        stored = session.scalars(select(AuditEvent)).one()
    assert stored.ts == event.ts
    assert stored.ts.tzinfo is not None and stored.ts.utcoffset() == timedelta(0)


def test_append_event_in_a_rolled_back_transaction_leaves_no_gap(session_factory: Any) -> None:
    append(session_factory)
    with session_factory() as session, session.begin():
        append_event(session, action="x.y", key_id="k", team="t", payload={})
        session.rollback()
    (event,) = append(session_factory)
    assert event.seq == 2


def test_appends_after_a_rolled_back_savepoint_continue_the_chain(session_factory: Any) -> None:
    with session_factory() as session, session.begin():
        append_event(session, action="x.first", key_id="k", team="t", payload={})
        savepoint = session.begin_nested()
        append_event(session, action="x.discarded", key_id="k", team="t", payload={})
        savepoint.rollback()
        last = append_event(session, action="x.second", key_id="k", team="t", payload={})
    with session_factory() as session:
        report = verify_database(session)
        actions = list(session.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))
    assert report.ok and last.seq == 2 and actions == ["x.first", "x.second"]


def test_many_appends_in_one_transaction_are_numbered_in_order(session_factory: Any) -> None:
    events = append(session_factory, 25)
    assert [e.seq for e in events] == list(range(1, 26))
    with session_factory() as session:
        assert verify_database(session).count == 25


def test_append_event_refuses_a_payload_that_is_not_json(session_factory: Any) -> None:
    with pytest.raises(ValueError, match="set is not JSON"):
        append(session_factory, payload={"tags": {"a"}})


def test_append_event_requires_an_action(session_factory: Any) -> None:
    with pytest.raises(AuditLogError, match="needs an action"):
        append(session_factory, action="")


def test_append_event_names_the_missing_chain_head() -> None:
    engine = make_engine("sqlite://")
    from audit.db import Base

    Base.metadata.create_all(engine)
    with make_session_factory(engine)() as session, pytest.raises(AuditLogError, match="migrate"):
        append_event(session, action="x.y", key_id="k", team="t", payload={})


def test_concurrent_sqlite_writer_processes_never_fork_the_chain(sqlite_url: str, session_factory: Any) -> None:
    run_writers(sqlite_url, processes=3, count=20)
    with session_factory() as session:
        report = verify_database(session)
    assert report.ok and report.count == 60, report.summary


@pytest.mark.services
@pytest.mark.parametrize("per_commit", [1, 5])
def test_concurrent_postgres_writer_processes_never_fork_the_chain(
    pg_url: str, pg_session_factory: Any, per_commit: int
) -> None:
    run_writers(pg_url, processes=4, count=50, per_commit=per_commit)
    with pg_session_factory() as session:
        report = verify_database(session)
        writers = set(session.scalars(select(AuditEvent.key_id)))
    assert report.ok and report.count == 200, report.summary
    assert writers == {"worker-0", "worker-1", "worker-2", "worker-3"}


def test_append_many_numbers_and_links_events_in_order(session_factory: Any) -> None:
    with session_factory() as session, session.begin():
        first = append_event(session, action="x.first", key_id="k", team="t", payload={})
        events = append_many(session, [NewEvent("x.many", "k", "t", {"i": i}, job_id="job-1") for i in range(5)])
    assert [e.seq for e in events] == [2, 3, 4, 5, 6]
    assert events[0].prev_hash == first.hash
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))
    with session_factory() as session:
        assert verify_database(session).count == 6
        stored = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
    assert [(s.seq, s.hash, s.payload) for s in stored[1:]] == [(e.seq, e.hash, e.payload) for e in events]


def test_append_many_checks_every_event_before_writing_any(session_factory: Any) -> None:
    with session_factory() as session, session.begin(), pytest.raises(ValueError, match="set is not JSON"):
        append_many(session, [NewEvent("x.ok", "k", "t", {}), NewEvent("x.bad", "k", "t", {"s": {1}})])
    with session_factory() as session:
        assert session.scalar(select(AuditEvent.seq)) is None


def test_append_many_of_nothing_takes_no_lock(session_factory: Any) -> None:
    with session_factory() as session, session.begin():
        assert append_many(session, []) == []
        assert not session.info


def test_appended_event_body_hashes_to_its_hash(session_factory: Any) -> None:
    (event,) = append(session_factory, payload={"ratio": 0.1, "text": "naïve ✓", "nested": [1.5e-07, None]})
    assert event_hash(event.prev_hash, event.body()) == event.hash


PAYLOADS = [
    {"ratio": 0.1, "big": 1e300, "small": -2.5e-08, "int": 2**63, "neg": -0.0},
    {"text": "naïve café ✓ 日本語 \U0001f600", "quote": "a \"b\" \\ c", "ctrl": "\x00\x01\n\t"},
    {"nested": {"z": [1, {"b": None, "a": True}], "a": []}, "empty": {}},
]


@pytest.mark.services
def test_postgres_append_many_stores_payloads_exactly_as_hashed(pg_session_factory: Any) -> None:
    with pg_session_factory() as session, session.begin():
        events = append_many(session, [NewEvent("x.y", "k", "t", payload, job_id=None) for payload in PAYLOADS])
    with pg_session_factory() as session:
        stored = list(session.scalars(text("SELECT payload::text FROM audit_events ORDER BY seq")))
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
        report = verify_database(session)
    assert stored == [canonical_json(payload) for payload in PAYLOADS]
    assert [(r.seq, r.ts, r.hash) for r in rows] == [(e.seq, e.ts, e.hash) for e in events]
    assert report.ok and report.count == 3, report.summary


@pytest.mark.services
def test_postgres_appends_after_a_rolled_back_savepoint_continue_the_chain(pg_session_factory: Any) -> None:
    with pg_session_factory() as session, session.begin():
        append_event(session, action="x.first", key_id="k", team="t", payload={})
        savepoint = session.begin_nested()
        append_many(session, [NewEvent("x.discarded", "k", "t", {})] * 3)
        savepoint.rollback()
        last = append_event(session, action="x.second", key_id="k", team="t", payload={})
    with pg_session_factory() as session:
        report = verify_database(session)
    assert report.ok and report.count == 2 and last.seq == 2, report.summary


@pytest.mark.services
def test_postgres_rolled_back_appends_leave_the_head_where_it_was(pg_session_factory: Any) -> None:
    append(pg_session_factory)
    with pg_session_factory() as session, session.begin():
        append_many(session, [NewEvent("x.discarded", "k", "t", {})] * 2)
        session.rollback()
    (event,) = append(pg_session_factory)
    with pg_session_factory() as session:
        head = session.get(ChainHead, 1)
        report = verify_database(session)
    assert event.seq == 2 and head is not None and (head.seq, head.hash) == (2, event.hash)
    assert report.ok, report.summary


@pytest.mark.services
def test_postgres_head_read_after_appends_in_the_same_transaction_is_the_new_head(pg_session_factory: Any) -> None:
    with pg_session_factory() as session, session.begin():
        events = append_many(session, [NewEvent("x.y", "k", "t", {"i": i}) for i in range(3)])
        head = session.get(ChainHead, 1)
        stored = session.execute(text("SELECT seq, hash FROM chain_head")).one()
        assert head is not None and (head.seq, head.hash) == tuple(stored) == (3, events[-1].hash)
        savepoint = session.begin_nested()
        append_many(session, [NewEvent("x.z", "k", "t", {})])
        savepoint.commit()
        last = append_event(session, action="x.last", key_id="k", team="t", payload={})
    with pg_session_factory() as session:
        report = verify_database(session)
    assert last.seq == 5 and report.ok and report.count == 5, report.summary


def test_appended_events_get_distinct_version_4_uuids(session_factory: Any) -> None:
    with session_factory() as session, session.begin():
        events = append_many(session, [NewEvent("x.y", "k", "t", {"i": i}) for i in range(50)])
    parsed = [uuid.UUID(e.id) for e in events]
    assert [str(u) for u in parsed] == [e.id for e in events]
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in parsed) and len(set(parsed)) == 50


@pytest.mark.services
def test_postgres_append_after_another_engine_moved_the_head_chains_on_the_moved_head(
    pg_url: str, pg_session_factory: Any
) -> None:
    first = append(pg_session_factory)[0]  # this engine now knows the head: its next append chains on it
    other = make_engine(pg_url)
    moved = append(make_session_factory(other), 2)
    other.dispose()
    (last,) = append(pg_session_factory)
    with pg_session_factory() as session:
        report = verify_database(session)
    assert (moved[0].prev_hash, last.seq, last.prev_hash) == (first.hash, 4, moved[-1].hash)
    assert report.ok and report.count == 4, report.summary


@pytest.mark.services
def test_postgres_append_on_the_known_head_leaves_it_locked_and_moved_for_the_transaction(
    pg_session_factory: Any
) -> None:
    append(pg_session_factory)
    with pg_session_factory() as session, session.begin():
        events = append_many(session, [NewEvent("x.y", "k", "t", {"i": i}) for i in range(3)])
        head = session.get(ChainHead, 1)
        stored = session.execute(text("SELECT seq, hash FROM chain_head")).one()
        assert head is not None and (head.seq, head.hash) == tuple(stored) == (4, events[-1].hash)
        savepoint = session.begin_nested()
        append_many(session, [NewEvent("x.z", "k", "t", {})])
        savepoint.rollback()
        last = append_event(session, action="x.last", key_id="k", team="t", payload={})
    with pg_session_factory() as session:
        report = verify_database(session)
    assert last.seq == 5 and report.ok and report.count == 5, report.summary
