"""Standalone chain check shipped in every evidence pack as verify_chain.py: Python 3.8+, standard library only.

    python3 verify_chain.py events.jsonl

Recomputes every event hash and link of a full export from genesis and checks that every checkpoint's
(seq, head_hash) is on the chain. It does not check checkpoint signatures (that needs a crypto library:
see HOW-TO-VERIFY.txt). It deliberately repeats the rules of audit/chain.py instead of importing them, so
an auditor can read the whole check on one page. Exit status 0: the chain verifies.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

GENESIS = "0" * 64
FORMAT, VERSION = "llamagen-gateway.audit-export", 1  # the header every export begins with


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: with a repeated key, readers disagree on which value it has."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise ValueError(f"the key {key!r} appears twice in one object")
        value[key] = item
    return value


def check(path: str) -> str | None:
    checkpoints: dict[int, str] = {}
    prev, expected, seen_header = GENESIS, 1, False
    with open(path, encoding="utf-8-sig") as lines:  # -sig: a byte-order mark some editors add is not content
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line, object_pairs_hook=_object)
            except (ValueError, RecursionError) as exc:
                return f"line {number}: not a JSON record of an export ({exc})"
            if not isinstance(record, dict):
                return f"line {number}: not a JSON object"
            kind = record.get("type")
            if not seen_header and kind != "header":
                return f"line {number}: the export must begin with its header line"
            if kind == "header":
                if seen_header:
                    return f"line {number}: a second header"
                if record.get("format") != FORMAT or record.get("version") != VERSION:
                    return f"line {number}: not a {FORMAT} version {VERSION} file"
                if record.get("filters"):
                    return f"{path} is a filtered export: only a full export proves the chain"
                seen_header = True
            elif kind == "checkpoint":
                if expected > 1:
                    return f"line {number}: a checkpoint after the events (exports write them first)"
                checkpoints[record["seq"]] = record["head_hash"]
            elif kind == "error":
                return f"line {number}: the export was cut short: {record.get('message')}"
            elif kind == "event":
                body = record["body"]
                if body["seq"] != expected:
                    return f"line {number}: expected seq {expected}, found {body['seq']} (deleted or moved)"
                if record["prev_hash"] != prev:
                    return f"seq {expected}: prev_hash does not match the previous event's hash"
                digest = hashlib.sha256((prev + "\n" + canonical(body)).encode("utf-8")).hexdigest()
                if digest != record["hash"]:
                    return f"seq {expected}: hash does not match the event's content (event altered)"
                if checkpoints.get(expected, digest) != digest:
                    return f"seq {expected}: a checkpoint signs a different hash"
                prev, expected = digest, expected + 1
            else:
                return f"line {number}: unknown record type {kind!r}"
    if not seen_header:
        return f"{path} is empty: no header line"
    last = expected - 1
    beyond = [seq for seq in checkpoints if seq > last]
    if beyond:
        return f"a checkpoint covers seq {max(beyond)} but the chain ends at seq {last} (events truncated)"
    covered = max(checkpoints, default=0)
    print(f"chain OK: {last} events; {last - covered} tail event(s) after the last checkpoint")  # noqa: T201
    return None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 verify_chain.py events.jsonl")
    problem = check(sys.argv[1])
    if problem:
        sys.exit(f"chain BROKEN: {problem}")
