"""audit/chain.py: canonical JSON, event hashes, and detection of every kind of tampering."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from audit.chain import (
    GENESIS_HASH,
    Anchor,
    CanonicalJSONError,
    ChainBrokenError,
    canonical_json,
    event_body,
    event_hash,
    format_ts,
    require_valid,
    verify_chain,
    verify_fragments,
)

T0 = datetime(2026, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)


def build_chain(n: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        body = {
            "seq": seq,
            "id": f"00000000-0000-4000-8000-{seq:012d}",
            "ts": format_ts(T0 + timedelta(seconds=seq)),
            "action": "generation.requested",
            "key_id": "key-1",
            "team": "ads",
            "job_id": None,
            "payload": {"seed": seq, "scores": {"toxicity": 0.01 * seq}, "prompt": {"storage": "hashed"}},
        }
        digest = event_hash(prev, body)
        events.append({**body, "prev_hash": prev, "hash": digest})
        prev = digest
    return events


def test_canonical_json_sorts_keys_at_every_level_without_whitespace() -> None:
    assert canonical_json({"b": 1, "a": {"d": 2, "c": [3, {"f": 4, "e": 5}]}}) == (
        '{"a":{"c":[3,{"e":5,"f":4}],"d":2},"b":1}'
    )


def test_canonical_json_writes_floats_in_shortest_round_trip_form() -> None:
    assert canonical_json([0.1, 1e-07, 2.0, 1e16, -0.0]) == "[0.1,1e-07,2.0,1e+16,-0.0]"


def test_canonical_json_keeps_non_ascii_as_utf8() -> None:
    assert canonical_json({"prompt": "café ☕"}) == '{"prompt":"café ☕"}'


def test_canonical_json_refuses_nan_and_infinity() -> None:
    with pytest.raises(CanonicalJSONError, match="not canonical JSON"):
        canonical_json({"score": float("nan")})


def test_canonical_json_refuses_keys_that_cannot_be_sorted() -> None:
    with pytest.raises(CanonicalJSONError, match="not canonical JSON"):
        canonical_json({1: "a", "b": 2})


def test_canonical_json_writes_datetimes_as_utc_with_microseconds() -> None:
    paris = timezone(timedelta(hours=1))
    assert canonical_json(datetime(2026, 1, 31, 13, 0, tzinfo=paris)) == '"2026-01-31T12:00:00.000000Z"'


def test_canonical_json_refuses_naive_datetimes() -> None:
    with pytest.raises(CanonicalJSONError, match="naive datetime"):
        canonical_json(datetime(2026, 1, 31, 12, 0))


def test_canonical_json_refuses_values_that_are_not_json() -> None:
    with pytest.raises(CanonicalJSONError, match="bytes is not JSON"):
        canonical_json({"blob": b"\x00"})


def test_event_hash_depends_on_the_previous_hash() -> None:
    body = build_chain(1)[0]
    assert event_hash(GENESIS_HASH, body) != event_hash("f" * 64, body)


def test_event_hash_ignores_key_order_of_the_body() -> None:
    body = {"seq": 1, "payload": {"a": 1, "b": 2}}
    assert event_hash(GENESIS_HASH, body) == event_hash(GENESIS_HASH, {"payload": {"b": 2, "a": 1}, "seq": 1})


def test_verify_chain_accepts_an_intact_chain() -> None:
    report = verify_chain(build_chain(5))
    assert (report.ok, report.count, report.head_seq, report.first_bad_seq) == (True, 5, 5, None)


def test_verify_chain_accepts_the_empty_chain() -> None:
    report = verify_chain([])
    assert report.ok and report.count == 0 and report.head_hash == GENESIS_HASH


def test_verify_chain_reports_first_tampered_event() -> None:
    events = build_chain(6)
    events[3]["payload"]["seed"] = 999
    report = verify_chain(events)
    assert (report.ok, report.first_bad_seq) == (False, 4)
    assert "event altered" in report.reason


def test_verify_chain_detects_an_edited_top_level_field() -> None:
    events = build_chain(4)
    events[1]["team"] = "someone-else"
    assert verify_chain(events).first_bad_seq == 2


def test_verify_chain_detects_an_edited_event_whose_hash_was_recomputed() -> None:
    events = build_chain(4)
    events[1]["action"] = "generation.blocked"
    events[1]["hash"] = event_hash(events[1]["prev_hash"], event_body(events[1]))
    report = verify_chain(events)
    assert report.first_bad_seq == 3
    assert "prev_hash" in report.reason


def test_verify_chain_detects_a_deleted_event() -> None:
    events = build_chain(5)
    del events[2]
    report = verify_chain(events)
    assert report.first_bad_seq == 4
    assert "event(s) 3 missing" in report.reason


def test_verify_chain_detects_reordered_events() -> None:
    events = build_chain(5)
    events[1], events[2] = events[2], events[1]
    report = verify_chain(events)
    assert not report.ok and report.first_bad_seq == 3


def test_verify_chain_detects_renumbered_events_after_a_deletion() -> None:
    events = build_chain(5)
    del events[2]
    for event in events[2:]:
        event["seq"] -= 1
    report = verify_chain(events)
    assert report.first_bad_seq == 3


def test_verify_chain_detects_truncation_covered_by_a_checkpoint() -> None:
    events = build_chain(6)
    anchor = Anchor(6, events[5]["hash"], "checkpoint of 2026-01-31")
    report = verify_chain(events[:4], [anchor])
    assert not report.ok and report.first_bad_seq == 5
    assert "truncated" in report.reason


def test_verify_chain_cannot_see_truncation_of_an_uncovered_tail_and_says_how_long_it_is() -> None:
    events = build_chain(6)
    report = verify_chain(events[:5], [Anchor(3, events[2]["hash"], "checkpoint of 2026-01-31")])
    assert report.ok and report.uncovered_tail == 2 and report.last_checkpoint_seq == 3


def test_verify_chain_detects_an_anchor_with_a_different_hash() -> None:
    events = build_chain(4)
    report = verify_chain(events, [Anchor(2, "a" * 64, "checkpoint of 2026-01-31")])
    assert report.first_bad_seq == 2 and "signs a different hash" in report.reason


def test_verify_chain_detects_a_wholly_rewritten_chain_against_a_checkpoint() -> None:
    events = build_chain(3)
    anchor = Anchor(3, events[2]["hash"], "checkpoint of 2026-01-31")
    forged = build_chain(3)
    forged[0]["payload"]["seed"] = 42  # then rehash everything from there, as a forger would
    prev = GENESIS_HASH
    for event in forged:
        event["prev_hash"] = prev
        event["hash"] = prev = event_hash(prev, event_body(event))
    report = verify_chain(forged, [anchor])
    assert report.first_bad_seq == 3


def test_verify_fragments_checks_each_event_of_a_filtered_selection() -> None:
    events = build_chain(6)
    selection = [events[0], events[2], events[3]]
    report = verify_fragments(selection)
    assert report.ok and report.count == 3 and "continuity across gaps not checked" in report.reason


def test_verify_fragments_reports_an_altered_event() -> None:
    events = copy.deepcopy(build_chain(6))
    events[4]["payload"]["seed"] = 0
    assert verify_fragments([events[1], events[4]]).first_bad_seq == 5


def test_require_valid_raises_with_the_first_bad_seq() -> None:
    events = build_chain(3)
    events[2]["key_id"] = "forged"
    with pytest.raises(ChainBrokenError, match="seq 3") as info:
        require_valid(verify_chain(events))
    assert info.value.seq == 3
