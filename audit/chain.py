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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

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
    except CanonicalJSONError:
        raise
    except (ValueError, TypeError) as exc:  # NaN/infinity; keys of mixed types that cannot be sorted
        raise CanonicalJSONError(f"not canonical JSON: {exc}") from exc


class CanonicalText(str):
    """JSON text that is already canonical: `store_json` writes it verbatim instead of encoding it again."""

    __slots__ = ()


def store_json(value: Any) -> str:
    """The JSON serializer of our engines: canonical JSON, and `CanonicalText` as it is."""
    if type(value) is CanonicalText:
        return str.__str__(value)
    return canonical_json(value)


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


# The string encoder json.dumps uses with ensure_ascii=False (the C one when available).
_encode_str: Callable[[str], str] = json.encoder.encode_basestring


def body_bytes(
    *, seq: int, id: str, ts: str, action: str, key_id: str, team: str, job_id: str | None, payload_json: str
) -> bytes:
    """The canonical body from columns, given the payload already as canonical JSON text (as stored).

    Equal to `canonical_json(body).encode()` whenever `payload_json` is canonical; it skips re-encoding
    the payload, which is most of the cost of verifying a large chain.
    """
    job = "null" if job_id is None else _encode_str(job_id)
    return (
        f'{{"action":{_encode_str(action)},"id":{_encode_str(id)},"job_id":{job},'
        f'"key_id":{_encode_str(key_id)},"payload":{payload_json},"seq":{seq},'
        f'"team":{_encode_str(team)},"ts":{_encode_str(ts)}}}'
    ).encode()


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
    checkpoint_signers: list[str] = field(default_factory=list)
    signers_trusted: bool | None = None  # None: checkpoint signers not checked against trust anchors

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
        signers = ""
        if self.checkpoints:
            trust = {True: "trusted", False: "NOT trusted",
                     None: "not checked against a trust list"}[self.signers_trusted]
            signers = f"; signed by {', '.join(self.checkpoint_signers) or 'nobody'} ({trust})"
        return (
            f"chain OK: {self.count} events, head seq {self.head_seq}; {self.checkpoints} signed "
            f"checkpoint(s), {covered}; {self.uncovered_tail} tail event(s) not yet covered by a checkpoint"
            f"{signers}"
        )


class Link(NamedTuple):
    """One event as the verifier sees it.

    `raw_body` is the canonical body exactly as stored or exported, when the source has it: hashing those
    bytes needs no JSON parsing (the fast path). `body` parses the event when there are no raw bytes, or
    when they do not hash right (a tool may have re-serialised an export), so only a real change fails.
    """

    seq: Any
    prev_hash: Any
    hash: Any
    raw_body: bytes | memoryview | None
    body: Callable[[], Mapping[str, Any]] | None  # None: parse `raw_body`


def links_of(events: Iterable[Mapping[str, Any]]) -> Iterator[Link]:
    """Links for event mappings (BODY_FIELDS plus prev_hash and hash), parsed already."""
    for event in events:
        yield Link(event.get("seq"), event.get("prev_hash"), event.get("hash"), None, partial(event_body, event))


def raw_event_hash(prev_hash: str, raw_body: bytes | memoryview) -> str:
    """An event's hash from its canonical body bytes as stored (the same as `event_hash` of the parsed body)."""
    digest = hashlib.sha256(prev_hash.encode("ascii"))
    digest.update(b"\n")
    digest.update(raw_body)
    return digest.hexdigest()


def raw_body_verifies(link: Link, prev_hash: str) -> bool:
    """Whether the link's stored bytes are exactly the bytes its hash covers (the fast path)."""
    return link.raw_body is not None and raw_event_hash(prev_hash, link.raw_body) == link.hash


def link_hash(link: Link, prev_hash: str) -> str | None:
    """The link's hash recomputed on `prev_hash`, or None when its stated hash is right."""
    if raw_body_verifies(link, prev_hash):
        return None
    body = link.body() if link.body is not None else parse_body(link.raw_body)
    computed = event_hash(prev_hash, body)
    return None if computed == link.hash else computed


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise DuplicateKeyError(f"the key {key!r} appears twice in one JSON object")
        value[key] = item
    return value


class DuplicateKeyError(ValueError):
    """JSON with a repeated key: readers disagree on its value (Python keeps the last, others the first), so
    evidence must not contain it."""


def loads_strict(data: str | bytes) -> Any:
    """`json.loads` that refuses repeated keys (DuplicateKeyError) instead of keeping the last one."""
    return json.loads(data, object_pairs_hook=_unique_keys)


def parse_body(raw: bytes | memoryview | None) -> dict[str, Any]:
    """An event body parsed from its JSON bytes."""
    if raw is None:
        raise ChainBrokenError("the event has neither a body nor its bytes")
    try:
        body = loads_strict(bytes(raw))
    except (ValueError, RecursionError) as exc:  # not JSON, a repeated key, absurd nesting
        raise ChainBrokenError(f"the event body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ChainBrokenError("the event body is not a JSON object")
    return body


def verify_chain(
    events: Iterable[Mapping[str, Any]],
    anchors: Sequence[Anchor] = (),
    *,
    start_prev_hash: str = GENESIS_HASH,
) -> ChainReport:
    """Verify events (mappings with BODY_FIELDS, prev_hash and hash) in seq order; see `verify_links`."""
    return verify_links(links_of(events), anchors, start_prev_hash=start_prev_hash)


def verify_links(
    links: Iterable[Link],
    anchors: Sequence[Anchor] = (),
    *,
    start_prev_hash: str = GENESIS_HASH,
    start_seq: int = 1,
) -> ChainReport:
    """Verify a whole chain in seq order: numbering, links, hashes, and every anchor's (seq, hash).

    The first event must have seq `start_seq` and prev_hash `start_prev_hash` (a later start resumes
    after events 1..start_seq-1, verified already by the caller along with their anchors). An anchor
    beyond the last event means the tail was truncated. Stops at the first problem.
    """
    anchor_at: dict[int, list[Anchor]] = {}
    for anchor in anchors:
        anchor_at.setdefault(anchor.seq, []).append(anchor)
    covered_seq = max((a.seq for a in anchors if a.source.startswith("checkpoint")), default=None)

    expected_seq = start_seq
    prev = start_prev_hash
    count = start_seq - 1

    def broken(seq: int, reason: str) -> ChainReport:
        return ChainReport(ok=False, count=count, first_bad_seq=seq, reason=reason, head_seq=count,
                           head_hash=prev, last_checkpoint_seq=covered_seq)

    for link in links:
        seq = link.seq
        if seq != expected_seq:
            if isinstance(seq, int) and seq > expected_seq:
                missing = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}..{seq - 1}"
                return broken(seq, f"event(s) {missing} missing before seq {seq} (deleted or reordered)")
            return broken(expected_seq, f"expected seq {expected_seq}, found {seq!r} (duplicated or moved)")
        if link.prev_hash != prev:
            return broken(seq, "prev_hash does not match the hash of the event before it")
        if not raw_body_verifies(link, prev):
            try:
                wrong = link_hash(link, prev)
            except (CanonicalJSONError, ChainBrokenError, ValueError) as exc:
                return broken(seq, f"event body is unreadable: {exc}")
            if wrong is not None:
                return broken(seq, "hash does not match the event's content (event altered)")
        if seq in anchor_at:
            for anchor in anchor_at[seq]:
                if anchor.head_hash != link.hash:
                    return broken(seq, f"{anchor.source} signs a different hash for this seq")
        prev = link.hash
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
    """Verify a filtered selection of events; see `verify_fragment_links`."""
    return verify_fragment_links(links_of(events), anchors)


def verify_fragment_links(links: Iterable[Link], anchors: Sequence[Anchor] = ()) -> ChainReport:
    """Verify a filtered selection: each hash against its own content and prev_hash, links wherever two
    consecutive seqs are both present, and anchors at the seqs present. Continuity across the gaps cannot
    be proved from a filtered export; `reason` says so.
    """
    anchor_at: dict[int, list[Anchor]] = {}
    for anchor in anchors:
        anchor_at.setdefault(anchor.seq, []).append(anchor)
    previous: tuple[int, str] | None = None
    count = 0

    def broken(seq: int | None, reason: str) -> ChainReport:
        return ChainReport(ok=False, count=count, first_bad_seq=seq, reason=reason)

    for link in links:
        seq = link.seq
        if not isinstance(seq, int) or (previous is not None and seq <= previous[0]):
            return broken(seq if isinstance(seq, int) else None, f"seq {seq!r} is out of order")
        prev_hash = str(link.prev_hash)
        if previous is not None and seq == previous[0] + 1 and prev_hash != previous[1]:
            return broken(seq, "prev_hash does not match the hash of the event before it")
        try:
            wrong = link_hash(link, prev_hash)
        except (CanonicalJSONError, ChainBrokenError, ValueError) as exc:
            return broken(seq, f"event body is unreadable: {exc}")
        if wrong is not None:
            return broken(seq, "hash does not match the event's content (event altered)")
        if any(anchor.head_hash != link.hash for anchor in anchor_at.get(seq, ())):
            return broken(seq, "a signed checkpoint signs a different hash for this seq")
        previous = (seq, str(link.hash))
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
