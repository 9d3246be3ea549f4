"""audit/group_commit.py: concurrent appenders share commits without forking the chain or losing events."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import pytest
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from audit.db import Base, make_engine, make_session_factory
from audit.group_commit import GroupCommitter
from audit.log import AuditLogError, NewEvent, append_many
from audit.models import AuditEvent, PromptText
from audit.verify import verify_database


def event(i: int, key: str = "k") -> NewEvent:
    return NewEvent(action="load.append", key_id=key, team="load", payload={"i": i})


def queued_behind_a_held_commit(committer: GroupCommitter, calls: list[Callable[[], Any]]) -> list[Any]:
    """Start `calls` (committer calls) in order, each queued while a first unit holds a commit open, then let
    them commit; each call's result, or the exception it raised."""
    leading, release = threading.Event(), threading.Event()
    outcomes: list[Any] = [None] * len(calls)

    def hold(session: Session) -> None:
        leading.set()
        release.wait(10)

    def call(index: int) -> None:
        try:
            outcomes[index] = calls[index]()
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcomes[index] = exc

    holder = threading.Thread(target=committer.run, args=(hold,))
    holder.start()
    assert leading.wait(10)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for queued, thread in enumerate(threads, start=1):
        thread.start()
        while len(committer._queue) < queued:
            threading.Event().wait(0.005)
    release.set()
    for thread in [holder, *threads]:
        thread.join(10)
    return outcomes


def test_group_committer_returns_each_caller_its_chained_events(session_factory: Any) -> None:
    committer = GroupCommitter(session_factory)
    first = committer.append(event(0))
    rest = committer.append_many([event(1), event(2)])
    assert [e.seq for e in [first, *rest]] == [1, 2, 3] and rest[0].prev_hash == first.hash
    with session_factory() as session:
        report = verify_database(session)
    assert report.ok and report.count == 3 and committer.commits == 2


def test_a_batch_holds_at_most_64_units_of_work(session_factory: Any) -> None:
    """Each unit is a savepoint (a PostgreSQL subtransaction); a backend caches only 64 of them per transaction."""
    committer = GroupCommitter(session_factory)
    batches: list[int] = []  # for each unit, the number of commits made before its own

    def unit(session: Session) -> None:
        batches.append(committer.commits)
        append_many(session, [event(len(batches))])

    queued_behind_a_held_commit(committer, [partial(committer.run, unit) for _ in range(100)])
    assert committer.commits == 3  # the holding unit, then 64 units, then the other 36
    assert Counter(batches) == {1: 64, 2: 36}
    with session_factory() as session:
        assert verify_database(session).count == 100


def test_requests_queued_during_a_commit_share_the_next_commit(session_factory: Any) -> None:
    committer = GroupCommitter(session_factory)
    queued_behind_a_held_commit(committer, [partial(committer.append, event(i, f"t{i}")) for i in range(8)])
    with session_factory() as session:
        report = verify_database(session)
    assert report.ok and report.count == 8, report.summary
    assert committer.commits == 2  # the holding unit, then all eight together


def test_a_failing_unit_rolls_back_alone(session_factory: Any) -> None:
    committer = GroupCommitter(session_factory)

    def good(session: Session) -> int:
        session.add(PromptText(commitment="c" * 64, salt=None, text=None, mode="hashed",
                               created_at=datetime.now(UTC)))
        return append_many(session, [event(1, "good")])[0].seq

    def bad(session: Session) -> None:
        append_many(session, [event(2, "bad"), event(3, "bad")])
        raise RuntimeError("unit failed after appending")

    bad_outcome, good_outcome, after = run_in_one_batch(
        committer, [bad, good, lambda s: append_many(s, [event(4, "after")])[0].seq])
    assert isinstance(bad_outcome, RuntimeError)
    assert (good_outcome, after) == (1, 2)
    with session_factory() as session:
        report = verify_database(session)
        keys = list(session.scalars(select(AuditEvent.key_id).order_by(AuditEvent.seq)))
        assert session.get(PromptText, "c" * 64) is not None
    assert report.ok and keys == ["good", "after"], report.summary
    assert committer.commits == 2


def test_a_failed_commit_fails_every_caller_in_it() -> None:
    engine = make_engine("sqlite://")
    Base.metadata.create_all(engine)  # no chain_head row: the batch cannot lock the head
    committer = GroupCommitter(make_session_factory(engine))
    with pytest.raises(AuditLogError, match="nothing in it was recorded.*migrate"):
        committer.append(event(0))


def test_a_bad_payload_fails_only_its_caller(session_factory: Any) -> None:
    committer = GroupCommitter(session_factory)
    with pytest.raises(ValueError, match="set is not JSON"):
        committer.append(NewEvent("x.y", "k", "t", {"s": {1}}))
    assert committer.append(event(0)).seq == 1


def threaded_writer(url: str, worker: int, threads: int, count: int) -> None:
    """A process whose threads append `count` events each through one GroupCommitter."""
    engine = make_engine(url)
    committer = GroupCommitter(make_session_factory(engine))

    def run(thread: int) -> None:
        for i in range(count):
            committer.append(event(i, f"w{worker}-t{thread}"))

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    engine.dispose()


@pytest.mark.services
def test_group_committing_postgres_processes_never_fork_the_chain(pg_url: str, pg_session_factory: Any) -> None:
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=threaded_writer, args=(pg_url, w, 6, 15)) for w in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0, 0]
    with pg_session_factory() as session:
        report = verify_database(session)
        writers = set(session.scalars(select(AuditEvent.key_id)))
    assert report.ok and report.count == 3 * 6 * 15, report.summary
    assert len(writers) == 18


def test_a_batch_chains_its_plain_appends_before_its_units_of_work(session_factory: Any) -> None:
    committer = GroupCommitter(session_factory)
    queued_behind_a_held_commit(committer, [
        partial(committer.run, lambda s: append_many(s, [event(0, "unit")])),
        partial(committer.append_many, [event(1, "plain"), event(2, "plain")]),
    ])
    with session_factory() as session:
        report = verify_database(session)
        keys = list(session.scalars(select(AuditEvent.key_id).order_by(AuditEvent.seq)))
    assert report.ok and keys == ["plain", "plain", "unit"], report.summary
    assert committer.commits == 2


def run_in_one_batch(committer: GroupCommitter, works: list[Any]) -> list[Any]:
    """Run `works` as units of one batch (queued while a first unit holds a commit open); their outcomes."""
    return queued_behind_a_held_commit(committer, [partial(committer.run, work) for work in works])


def prompt_row(tag: str) -> PromptText:
    return PromptText(commitment=tag.ljust(64, "0"), salt=None, text=None, mode="hashed", created_at=datetime.now(UTC))


def unit_writing(tag: str, events: int, fail: bool = False) -> Any:
    """A unit as a request records itself: one row, then its events; `fail` raises after both."""
    def work(session: Session) -> list[int]:
        session.add(prompt_row(tag))
        chained = append_many(session, [event(i, tag) for i in range(events)])
        if fail:
            raise RuntimeError(f"{tag} failed after appending")
        return [e.seq for e in chained]
    return work


def test_the_units_of_a_batch_insert_their_events_with_one_statement(session_factory: Any) -> None:
    committer = GroupCommitter(session_factory)
    inserts: list[str] = []
    engine = session_factory.kw["bind"]

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO AUDIT_EVENTS"):
            inserts.append(statement)

    sqlalchemy_event.listen(engine, "before_cursor_execute", count)
    outcomes = run_in_one_batch(committer, [unit_writing("a", 2), unit_writing("b", 1), unit_writing("c", 3)])
    sqlalchemy_event.remove(engine, "before_cursor_execute", count)
    assert outcomes == [[1, 2], [3], [4, 5, 6]]
    assert len(inserts) == 1 and committer.commits == 2


def test_events_appended_in_a_savepoint_that_rolls_back_are_dropped(session_factory: Any) -> None:
    committer = GroupCommitter(session_factory)

    def work(session: Session) -> list[int]:
        kept = append_many(session, [event(0, "kept")])
        try:
            with session.begin_nested():
                append_many(session, [event(1, "dropped"), event(2, "dropped")])
                raise RuntimeError("inner step failed")
        except RuntimeError:
            pass
        return [e.seq for e in kept + append_many(session, [event(3, "kept")])]

    assert committer.run(work) == [1, 2]
    assert committer.append(event(4, "after")).seq == 3
    with session_factory() as session:
        report = verify_database(session)
        keys = list(session.scalars(select(AuditEvent.key_id).order_by(AuditEvent.seq)))
    assert report.ok and keys == ["kept", "kept", "after"], report.summary


@pytest.mark.services
def test_postgres_units_chain_in_commit_order_around_a_failed_unit(pg_session_factory: Any) -> None:
    committer = GroupCommitter(pg_session_factory)
    committer.append(event(0, "plain"))  # the head has moved before the units' batch
    outcomes = run_in_one_batch(committer, [unit_writing("a", 2), unit_writing("bad", 2, fail=True),
                                            unit_writing("c", 1)])
    assert outcomes[0] == [2, 3] and isinstance(outcomes[1], RuntimeError) and outcomes[2] == [4]
    assert committer.run(unit_writing("d", 1)) == [5]
    with pg_session_factory() as session:
        report = verify_database(session)
        keys = list(session.scalars(select(AuditEvent.key_id).order_by(AuditEvent.seq)))
        rows = sorted(c.rstrip("0") for c in session.scalars(select(PromptText.commitment)))
    assert report.ok and keys == ["plain", "a", "a", "c", "d"], report.summary
    assert rows == ["a", "c", "d"]


@pytest.mark.parametrize("factory", ["session_factory", pytest.param("pg_session_factory", marks=pytest.mark.services)])
def test_a_unit_whose_rows_fail_to_flush_drops_its_events(factory: str, request: pytest.FixtureRequest) -> None:
    session_factory = request.getfixturevalue(factory)
    committer = GroupCommitter(session_factory)
    committer.run(unit_writing("dup", 1))
    outcomes = run_in_one_batch(committer, [unit_writing("a", 1), unit_writing("dup", 2), unit_writing("b", 1)])
    assert outcomes[0] == [2] and isinstance(outcomes[1], IntegrityError) and outcomes[2] == [3]
    with session_factory() as session:
        report = verify_database(session)
        keys = list(session.scalars(select(AuditEvent.key_id).order_by(AuditEvent.seq)))
    assert report.ok and keys == ["dup", "a", "b"], report.summary
