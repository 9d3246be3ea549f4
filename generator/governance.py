"""Policy revisions in the database and their loaded runtimes, shared by the gateway and the workers."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from audit.log import append_event
from audit.models import PolicyRevision
from policies.loader import LoadedPolicy, load_policy_file, load_policy_text
from policies.runtime import PolicyRuntime

ORG_SCOPE = "org"


class PolicyNotFoundError(Exception):
    """No stored policy revision has that id."""


@dataclass(frozen=True)
class StoredPolicy:
    revision: str
    policy_id: str
    version: str
    author: str
    reason: str
    created_at: datetime
    active: bool
    source: str


def _stored(row: PolicyRevision) -> StoredPolicy:
    return StoredPolicy(row.revision, row.policy_id, row.version, row.author, row.reason,
                        row.created_at, row.active, row.source)


class PolicyStore:
    """Stores revisions (content hash) and hands out one cached `PolicyRuntime` per revision."""

    def __init__(self, session_factory: sessionmaker[Session], models_dir: Path, device: str) -> None:
        self._sessions = session_factory
        self._models_dir = models_dir
        self._device = device
        self._runtimes: dict[str, PolicyRuntime] = {}
        self._lock = threading.Lock()

    def bootstrap(self, policy_file: Path) -> StoredPolicy:
        """Store and activate `policy_file` when no policy is active yet (first start)."""
        with self._sessions() as session, session.begin():
            active = session.scalar(select(PolicyRevision).where(
                PolicyRevision.active.is_(True), PolicyRevision.scope == ORG_SCOPE))
            if active is not None:
                return _stored(active)
        loaded = load_policy_file(policy_file)
        return self.store(loaded, author="system", reason=f"initial policy from {policy_file.name}",
                          activate=True, key_id="system", team=ORG_SCOPE)

    def store(self, loaded: LoadedPolicy, *, author: str, reason: str, activate: bool,
              key_id: str, team: str) -> StoredPolicy:
        """Record a validated policy as a revision (idempotent on content) and optionally activate it."""
        with self._sessions() as session, session.begin():
            row = session.get(PolicyRevision, loaded.revision)
            if row is None:
                row = PolicyRevision(revision=loaded.revision, policy_id=loaded.policy.id,
                                     version=str(loaded.policy.version), source=loaded.source,
                                     author=author, reason=reason, created_at=datetime.now(UTC),
                                     active=False, scope=ORG_SCOPE)
                session.add(row)
                session.flush()
                append_event(session, action="policy.created", key_id=key_id, team=team,
                             payload={"revision": loaded.revision, "policy_id": loaded.policy.id,
                                      "version": str(loaded.policy.version), "author": author,
                                      "reason": reason})
            if activate and not row.active:
                session.execute(update(PolicyRevision).where(PolicyRevision.scope == row.scope)
                                .values(active=False))
                row.active = True
                append_event(session, action="policy.activated", key_id=key_id, team=team,
                             payload={"revision": row.revision, "author": author, "reason": reason})
            session.flush()
            return _stored(row)

    def activate(self, revision: str, *, author: str, reason: str, key_id: str, team: str) -> StoredPolicy:
        with self._sessions() as session, session.begin():
            row = session.get(PolicyRevision, revision)
            if row is None:
                raise PolicyNotFoundError(f"no policy revision {revision}")
            source = row.source
        return self.store(load_policy_text(source, name=revision), author=author, reason=reason,
                          activate=True, key_id=key_id, team=team)

    def active_revision(self) -> StoredPolicy:
        with self._sessions() as session:
            row = session.scalar(select(PolicyRevision).where(
                PolicyRevision.active.is_(True), PolicyRevision.scope == ORG_SCOPE))
            if row is None:
                raise PolicyNotFoundError("no active policy: run `llamagen-gateway migrate` and start the gateway")
            return _stored(row)

    def get(self, revision: str) -> StoredPolicy:
        with self._sessions() as session:
            row = session.get(PolicyRevision, revision)
            if row is None:
                raise PolicyNotFoundError(f"no policy revision {revision}")
            return _stored(row)

    def history(self, *, limit: int = 50, offset: int = 0) -> tuple[list[StoredPolicy], int]:
        with self._sessions() as session:
            rows = session.scalars(select(PolicyRevision).order_by(PolicyRevision.created_at.desc())
                                   .limit(limit).offset(offset)).all()
            total = len(session.scalars(select(PolicyRevision.revision)).all())
            return [_stored(r) for r in rows], total

    def runtime(self, revision: str | None = None) -> PolicyRuntime:
        """The loaded runtime of `revision` (default: the active one); classifiers load once per revision."""
        if revision:
            with self._lock:  # a revision is a content hash: its runtime never changes once loaded
                cached = self._runtimes.get(revision)
            if cached is not None:
                return cached
        stored = self.get(revision) if revision else self.active_revision()
        with self._lock:
            runtime = self._runtimes.get(stored.revision)
            if runtime is None:
                loaded = load_policy_text(stored.source, name=f"policy revision {stored.revision}")
                runtime = PolicyRuntime(loaded, models_dir=self._models_dir, device=self._device)
                self._runtimes[stored.revision] = runtime
            return runtime
