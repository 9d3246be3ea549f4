"""Group commit: concurrent appenders in one process share a transaction, and so one durable commit.

Every append holds the chain head lock until its commit is durable, so one writer at a time pays a full
WAL flush: appends per second can never beat commits per second. A `GroupCommitter` lets the threads of a
process queue their events; whichever caller finds no commit in progress becomes the leader, takes every
queued request, appends all their events with one statement under one head lock, commits once, and hands
each caller its events (or the error). Callers block until the commit that holds their events is durable,
so nothing is acknowledged early: the guarantees are those of `append_many` in the caller's own transaction.
No thread is started and no timer delays a commit: a batch is whatever queued while the previous one was
committing, and, while other processes append too, while the leader waited for the head lock (it takes the
lock first then). A waiting caller is woken once: when its commit is done, or to lead the next batch (a
leader hands over to the oldest waiter once its own events are committed). Processes still serialise on
the head row, a batch at a time.

Units of work (`run`) carry their own row changes with their events (a job row and its audit events):
each runs in a savepoint of the shared transaction, so one unit's failure rolls back only that unit.
The units' events are chained in memory as they append and inserted with one statement after the last unit
(`audit.log.defer_appends`): a savepoint holds only its unit's row changes, and one that rolls back drops its
unit's events, the next unit chaining on the last event kept.
In the chain, a batch's plain appends come first (in queue order), then its units of work (in queue order):
the callers of one batch were concurrent, so no order between them was promised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from audit.log import (
    AuditLogError,
    ChainedEvent,
    NewEvent,
    PreparedEvent,
    append_prepared,
    defer_appends,
    insert_deferred,
    lock_chain_head,
    prepare,
)

T = TypeVar("T")
DEFAULT_MAX_BATCH = 1000
# Units of work per batch: each runs in its own savepoint, a subtransaction on PostgreSQL, and a backend caches
# at most 64 subtransaction ids; past that its snapshots overflow and every other session's visibility checks
# slow down until the transaction ends.
MAX_UNITS_PER_BATCH = 64


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False)
class _Request(Generic[T]):
    """One caller's share of a group commit: prepared events or a unit of work, then its outcome."""

    prepared: Sequence[PreparedEvent] = ()
    work: Callable[[Session], T] | None = None
    size: int = 1
    done: bool = False
    result: Any = None
    error: Exception | None = None
    batch_failed: bool = False  # the shared commit failed (not this request's own work)
    # Held from the start; released to wake the caller (cheaper than an Event: no Condition, no waiter lock).
    # Released at most once before each acquire: when its commit is done, or to hand it the leadership (then
    # the caller acquires it and only its own commit releases it again).
    wake: threading.Lock = field(default_factory=_held_lock)

    def outcome(self) -> Any:
        if self.batch_failed:
            # Each caller gets its own exception object: the batch's is shared between threads.
            raise AuditLogError(f"the audit commit failed, nothing in it was recorded: {self.error}") \
                from self.error
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommitter:
    """Appends from many threads of one process, coalesced into shared transactions (see the module)."""

    def __init__(self, sessions: sessionmaker[Session], *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self._sessions = sessions
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Request[Any]] = []
        self._leading = False
        # The head after this committer's last batch, and whether another writer had moved it when that batch
        # began (None: no batch yet). Contended, a leader waits for the head lock before it takes a batch.
        self._last_seq: int | None = None
        self._contended = True
        self.commits = 0  # transactions committed; with `events`, shows how well appends coalesce
        self.events = 0

    def append(self, event: NewEvent) -> ChainedEvent:
        """Append one event; returns once the commit holding it is durable."""
        return self.append_many([event])[0]

    def append_many(self, events: Sequence[NewEvent]) -> list[ChainedEvent]:
        """Append events (consecutive in the chain); returns once the commit holding them is durable.

        Events are checked and encoded in the calling thread, so a bad payload fails only its caller.
        """
        prepared = [prepare(event) for event in events]
        if not prepared:
            return []
        request: _Request[list[ChainedEvent]] = _Request(prepared=prepared, size=len(prepared))
        result: list[ChainedEvent] = self._submit(request)
        return result

    def run(self, work: Callable[[Session], T]) -> T:
        """Run `work(session)` in a savepoint of a shared transaction and return its result once committed.

        `work` makes its row changes and appends its events (`append_many`) with the session it is given;
        it must not commit, and should only write: it runs while the chain head is locked. It runs in the
        leader's thread. Its events are returned chained as they will be stored, but they are inserted
        after the batch's last unit: it cannot read them back from the table. An exception rolls back this
        unit alone (its rows and its events) and is raised to its caller.
        """
        request: _Request[T] = _Request(work=work)
        result: T = self._submit(request)
        return result

    def _submit(self, request: _Request[Any]) -> Any:
        with self._lock:
            self._queue.append(request)
            lead = not self._leading
            self._leading = True
        if not lead:
            request.wake.acquire()  # woken once: its commit is done, or it is handed the leadership
            if request.done:
                return request.outcome()
        try:
            while not request.done:  # lead: commit batches until this caller's own request is in one
                self._commit()
        finally:
            with self._lock:  # hand over to the oldest waiter (woken, not done: it leads), or stop leading
                if self._queue:
                    self._queue[0].wake.release()
                else:
                    self._leading = False
        return request.outcome()

    def _take(self) -> list[_Request[Any]]:
        """The oldest queued requests, up to `max_batch` events and MAX_UNITS_PER_BATCH units of work (at least
        one request)."""
        taken, size, units = 0, 0, 0
        for request in self._queue:
            unit = request.work is not None
            if taken and (size + request.size > self._max_batch or units + unit > MAX_UNITS_PER_BATCH):
                break
            taken += 1
            size += request.size
            units += unit
        batch, self._queue[:taken] = self._queue[:taken], []
        return batch

    def _commit(self) -> None:
        """One transaction for the oldest queued requests; every request taken ends done, with a result or
        an error.

        While other writers (processes) append too, the head lock is taken first and the batch after it:
        whatever queued while the lock was awaited joins the batch. Alone, the batch is taken first and its
        events lock, check and move the head with the insert (one round trip), so the callers woken by the
        last commit prepare their next events while this one is in flight.
        """
        batch: list[_Request[Any]] = []
        results: list[tuple[_Request[Any], Any]] = []
        events = 0
        try:
            with self._sessions() as session, session.begin():
                before = lock_chain_head(session).seq if self._contended else None
                with self._lock:
                    batch = self._take()
                appends = [request for request in batch if request.work is None]
                if appends:  # every caller's events with one statement; it leaves the head locked
                    chained = append_prepared(session, [item for request in appends for item in request.prepared])
                    start = 0
                    for request in appends:
                        results.append((request, chained[start:start + request.size]))
                        start += request.size
                    events = len(chained)
                    before = chained[0].seq - 1 if before is None else before
                units = [(request, request.work) for request in batch if request.work is not None]
                if units:
                    # The head is held already unless the batch is only units: then it is locked here, once.
                    # The units' events are chained in memory and inserted together after the last unit (one
                    # statement, which moves the head), so a unit's savepoint holds only its row changes; a
                    # unit that fails takes its events with it, and the next unit chains on the last kept.
                    defer_appends(session)
                    before = lock_chain_head(session).seq if before is None else before
                    for request, work in units:
                        try:
                            with session.begin_nested():
                                results.append((request, work(session)))
                        except Exception as exc:  # this unit only; the others still commit
                            request.error = exc
                    events += insert_deferred(session)
                after = lock_chain_head(session).seq
            self._contended, self._last_seq = before != self._last_seq, after
            self.commits += 1
            self.events += events
            for request, result in results:
                request.result = result
        except Exception as exc:  # the commit failed: nothing in the batch is durable
            if not batch:  # failed before taking one (no connection, no head): the oldest requests learn why
                with self._lock:
                    batch = self._take()
            for request in batch:
                request.result, request.error, request.batch_failed = None, exc, True
        finally:
            for request in batch:
                request.done = True
                request.wake.release()
