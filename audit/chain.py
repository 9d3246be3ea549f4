"""The hash chain, pure: canonical JSON, event hashes and chain verification (no I/O, no clock).

An event's hash is SHA-256 over `prev_hash` (64 lowercase hex characters, ASCII), one newline byte, and the
canonical JSON of the event body {seq, id, ts, action, key_id, team, job_id, payload}, UTF-8 encoded.
Canonical JSON: object keys sorted, no whitespace, non-ASCII characters kept as UTF-8, integers in decimal,
floats in their shortest round-trip form (Python's repr: 0.1, 1e-07, 2.0), NaN and infinities refused,
timestamps as UTC ISO-8601 with microseconds and a Z (2026-01-31T12:00:00.000000Z).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

GENESIS_HASH = "0" * 64
BODY_FIELDS = ("seq", "id", "ts", "action", "key_id", "team", "job_id", "payload")


class ChainBrokenError(Exception):
    """The chain does not verify; `seq` is the first bad event (None when the chain as a whole is wrong)."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class CanonicalJSONError(ValueError):
    """A value cannot be written as canonical JSON (NaN, infinity, or a non-JSON type)."""


def format_ts(value: datetime) -> str:
    """UTC ISO-8601 with microseconds and a Z; naive datetimes are refused."""
    if value.tzinfo is None:
        raise CanonicalJSONError(f"naive datetime {value!r}: audit timestamps must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(value: str) -> datetime:
    """Inverse of `format_ts`."""
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_ts(value)
    raise CanonicalJSONError(f"{type(value).__name__} is not JSON: {value!r}")


_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default
)


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed and signed (see the module docstring)."""
    try:
        return _ENCODER.encode(value)
    except ValueError as exc:  # allow_nan=False raises a plain ValueError
        if isinstance(exc, CanonicalJSONError):
            raise
        raise CanonicalJSONError(f"not canonical JSON: {exc}") from exc


def normalise(value: Any) -> Any:
    """`value` as it reads back after canonical JSON (what is stored is exactly what is hashed)."""
    return json.loads(canonical_json(value))


def event_hash(prev_hash: str, body: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the previous hash, a newline and the canonical JSON of the event body."""
    digest = hashlib.sha256(prev_hash.encode("ascii"))
    digest.update(b"\n")
    digest.update(canonical_json(body).encode("utf-8"))
    return digest.hexdigest()


def event_body(event: Mapping[str, Any]) -> dict[str, Any]:
    """The hashed fields of an event record (a dict with at least BODY_FIELDS)."""
    try:
        return {name: event[name] for name in BODY_FIELDS}
    except KeyError as exc:
        raise ChainBrokenError(f"event record lacks the field {exc.args[0]!r}", event.get("seq")) from exc


@dataclass(frozen=True)
class Anchor:
    """A chain head vouched for by something outside the events: a verified checkpoint or the head row."""

    seq: int
    head_hash: str
    source: str


@dataclass
class ChainReport:
    """What verification found; `first_bad_seq` and `reason` name the first problem."""

    ok: bool
    count: int
    first_bad_seq: int | None = None
    reason: str = ""
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    uncovered_tail: int = 0
    last_checkpoint_seq: int | None = None
    checkpoints: int = 0
    checkpoints_valid: bool = True
    checkpoint_problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary}

    @property
    def summary(self) -> str:
        if not self.ok:
            where = f" at event seq {self.first_bad_seq}" if self.first_bad_seq is not None else ""
            return f"chain BROKEN{where}: {self.reason}"
        covered = (
            f"checkpoint at seq {self.last_checkpoint_seq}"
            if self.last_checkpoint_seq is not None
            else "no signed checkpoint yet"
        )
        return (
            f"chain OK: {self.count} events, head seq {self.head_seq}; {self.checkpoints} signed "
            f"checkpoint(s), {covered}; {self.uncovered_tail} tail event(s) not yet covered by a checkpoint"
        )


def verify_chain(
    events: Iterable[Mapping[str, Any]],
    anchors: Sequence[Anchor] = (),
    *,
    start_prev_hash: str = GENESIS_HASH,
) -> ChainReport:
    """Verify events in seq order: numbering, links, hashes, and every anchor's (seq, hash).

    Events are mappings with BODY_FIELDS plus `prev_hash` and `hash`. The first event must have
    seq 1 and prev_hash `start_prev_hash`. An anchor beyond the last event means the tail was truncated.
    Stops at the first problem.
    """
    anchor_at: dict[int, list[Anchor]] = {}
    for anchor in anchors:
        anchor_at.setdefault(anchor.seq, []).append(anchor)
    covered_seq = max((a.seq for a in anchors if a.source.startswith("checkpoint")), default=None)

    expected_seq = 1
    prev = start_prev_hash
    count = 0

    def broken(seq: int, reason: str) -> ChainReport:
        return ChainReport(ok=False, count=count, first_bad_seq=seq, reason=reason, head_seq=count,
                           head_hash=prev, last_checkpoint_seq=covered_seq)

    for event in events:
        seq = event.get("seq")
        if seq != expected_seq:
            if isinstance(seq, int) and seq > expected_seq:
                missing = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}..{seq - 1}"
                return broken(seq, f"event(s) {missing} missing before seq {seq} (deleted or reordered)")
            return broken(expected_seq, f"expected seq {expected_seq}, found {seq!r} (duplicated or moved)")
        if event.get("prev_hash") != prev:
            return broken(seq, "prev_hash does not match the hash of the event before it")
        try:
            computed = event_hash(prev, event_body(event))
        except CanonicalJSONError as exc:
            return broken(seq, f"event body is not canonical JSON: {exc}")
        if computed != event.get("hash"):
            return broken(seq, "hash does not match the event's content (event altered)")
        for anchor in anchor_at.get(seq, ()):
            if anchor.head_hash != computed:
                return broken(seq, f"{anchor.source} signs a different hash for this seq")
        prev = computed
        count += 1
        expected_seq += 1

    last_seq = expected_seq - 1
    beyond = [a for a in anchors if a.seq > last_seq]
    if beyond:
        top = max(beyond, key=lambda a: a.seq)
        return broken(last_seq + 1, f"{top.source} covers seq {top.seq} but the chain ends at seq {last_seq} "
                                    "(events truncated)")
    return ChainReport(
        ok=True,
        count=count,
        head_seq=last_seq,
        head_hash=prev,
        uncovered_tail=last_seq - (covered_seq or 0),
        last_checkpoint_seq=covered_seq,
    )


def verify_fragments(events: Iterable[Mapping[str, Any]], anchors: Sequence[Anchor] = ()) -> ChainReport:
    """Verify a filtered selection of events: each hash against its own content and prev_hash, links
    wherever two consecutive seqs are both present, and anchors at the seqs present. Continuity across
    the gaps cannot be proved from a filtered export; `reason` says so.
    """
    anchor_at: dict[int, list[Anchor]] = {}
    for anchor in anchors:
        anchor_at.setdefault(anchor.seq, []).append(anchor)
    previous: tuple[int, str] | None = None
    count = 0
    for event in events:
        seq = event.get("seq")
        if not isinstance(seq, int) or (previous is not None and seq <= previous[0]):
            return ChainReport(ok=False, count=count, first_bad_seq=seq if isinstance(seq, int) else None,
                               reason=f"seq {seq!r} is out of order")
        prev_hash = str(event.get("prev_hash"))
        if previous is not None and seq == previous[0] + 1 and prev_hash != previous[1]:
            return ChainReport(ok=False, count=count, first_bad_seq=seq,
                               reason="prev_hash does not match the hash of the event before it")
        try:
            computed = event_hash(prev_hash, event_body(event))
        except CanonicalJSONError as exc:
            return ChainReport(ok=False, count=count, first_bad_seq=seq, reason=f"not canonical JSON: {exc}")
        if computed != event.get("hash"):
            return ChainReport(ok=False, count=count, first_bad_seq=seq,
                               reason="hash does not match the event's content (event altered)")
        if any(anchor.head_hash != computed for anchor in anchor_at.get(seq, ())):
            return ChainReport(ok=False, count=count, first_bad_seq=seq,
                               reason="a signed checkpoint signs a different hash for this seq")
        previous = (seq, computed)
        count += 1
    return ChainReport(
        ok=True,
        count=count,
        head_seq=previous[0] if previous else 0,
        head_hash=previous[1] if previous else GENESIS_HASH,
        reason="filtered export: each event verified on its own; continuity across gaps not checked",
    )


def require_valid(report: ChainReport) -> ChainReport:
    """Raise ChainBrokenError unless `report.ok`."""
    if not report.ok:
        raise ChainBrokenError(report.summary, report.first_bad_seq)
    return report
