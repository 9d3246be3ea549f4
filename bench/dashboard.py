"""Dashboard render times with a large audit log: every main page, median and worst of N renders.

Seeds a fresh SQLite database with 100,000 chained audit events (about 18,000 generations over 30 days:
requests, prompt and output screenings with the default policy's rule ids, released images, reviews,
moderations), inserted with Core executemany of pre-hashed rows exactly as `audit.log.append_event` would
hash them, then renders each page through the app in-process (server-side time: routing, queries,
templates). Target: every page under 300 ms.

    .venv/bin/python bench/dashboard.py [--events 100000] [--repeat 7] [--database-url URL] [--verify]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import insert, text, update  # noqa: E402

from audit.chain import canonical_json, event_hash  # noqa: E402
from audit.db import make_engine, make_session_factory, upgrade_database  # noqa: E402
from audit.log import lock_chain_head  # noqa: E402
from audit.models import AuditEvent, ChainHead, Job  # noqa: E402

TARGET_MS = 300.0
TEAMS = ["ads", "design", "editorial", "games", "retail", "research"]
MODELS = ["demo-shapes-t2i", "demo-shapes-c2i", "llamagen-t2i-xl"]
# (rule id, action) from policies/rules/default.yaml, with how often each fires among non-allowed prompts.
RULES = [("nudity", "block", 5), ("graphic_violence", "block", 4), ("public_figures", "review", 6),
         ("trademarks", "review", 5), ("hateful_caricature", "review", 2), ("shocking", "flag", 6),
         ("suggestive", "flag", 5), ("weapons_making", "block", 2)]
BATCH = 5_000
PROMPTS = ["a red star above a blue circle", "a watercolour lighthouse at dusk", "a product shot of a green mug",
           "a poster of a mountain trail", "an isometric city block at night", "a portrait of a senator waving",
           "a cartoon mouse with round ears", "a knight fighting a dragon, lots of blood",
           "a sketch of a bicycle", "a bowl of ramen, top view"]


def _reason(rule: str, action: str, rng: random.Random) -> dict[str, Any]:
    score = round(rng.uniform(0.5, 0.99), 4)
    return {"rule_id": rule, "classifier": "semantic", "label": rule, "score": score, "threshold": 0.5,
            "action": action, "message": f"{rule} fired"}


def _screening(action: str, reasons: list[dict[str, Any]], stage: str, revision: str) -> dict[str, Any]:
    return {"stage": stage, "decision": {"action": action, "stage": stage, "revision": revision,
                                         "reasons": reasons, "shadow": []},
            "results": [{"name": "semantic", "version": "minilm-l6-v2", "latency_ms": 9.5, "error": None,
                         "scores": {r["rule_id"]: r["score"] for r in reasons}}]}


def synthetic_history(n_events: int, revision: str, days: int = 30,
                      seed: int = 0) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(event fields, job row or None) in time order: `n_events` events spread evenly over the last `days`."""
    rng = random.Random(seed)
    weights = [w for _, _, w in RULES]
    span = timedelta(days=days)
    start = datetime.now(UTC) - span - timedelta(minutes=1)
    emitted = 0
    while emitted < n_events:
        now = start + span * (emitted / n_events)
        team, model = rng.choice(TEAMS), rng.choice(MODELS)
        key_id = f"key{TEAMS.index(team):02d}{rng.randrange(4)}"
        if rng.random() < 0.08:  # a moderation check: one event, no job
            action = rng.choice(["allow", "allow", "flag", "block"])
            reasons = [] if action == "allow" else [_reason(*_pick(action, rng, weights), rng)]
            yield ({"ts": now, "action": "moderation.screened", "key_id": key_id, "team": team, "job_id": None,
                    "payload": {"model": model, "action": action, "policy_revision": revision,
                                "screenings": [_screening(action, reasons, "prompt", revision)],
                                "context": {"team": team, "model": model, "use": None}}}, None)
            emitted += 1
            continue
        job_id = str(uuid.uuid4())
        roll = rng.random()
        prompt_action = "allow" if roll < 0.72 else "flag" if roll < 0.82 else "review" if roll < 0.9 else "block"
        reasons = [] if prompt_action == "allow" else [_reason(*_pick(prompt_action, rng, weights), rng)]
        screened = [_screening(prompt_action, reasons, "prompt", revision)]
        status = {"block": "blocked", "review": "review"}.get(prompt_action, "completed")
        job = {"id": job_id, "created_at": now, "updated_at": now, "status": status, "team": team,
               "key_id": key_id, "model": model, "model_card_hash": "sha256:" + "ab" * 32, "task": "t2i",
               "prompt": rng.choice(PROMPTS), "prompt_sha256": "cd" * 32, "class_id": None,
               "params": {"seed": rng.randrange(2**31), "num_images": 1}, "policy_revision": revision,
               "decisions": {"prompt": {"action": prompt_action, "screenings": screened}}, "images": [],
               "error": None, "timings": {}, "cost": {}, "review": None, "request_id": "bench", "attempts": 0}
        events = [("generation.requested", {"model": model, "policy_revision": revision,
                                            "prompt": {"mode": "hashed", "commitment": "ef" * 32}}),
                  ("prompt.screened", {"policy_revision": revision, "action": prompt_action,
                                       "screenings": screened, "context": {"team": team, "model": model}})]
        if prompt_action in ("allow", "flag"):
            sha = f"{rng.getrandbits(256):064x}"
            events += [("output.screened", {"policy_revision": revision, "action": "allow",
                                            "screenings": [_screening("allow", [], "output", revision)]}),
                       ("image.released", {"index": 0, "sha256": sha, "model": model,
                                           "manifest_id": f"urn:c2pa:{uuid.uuid4()}", "policy_revision": revision}),
                       ("generation.completed", {"images": 1})]
        else:
            events.append((f"generation.{status}", {"stage": "prompt", "action": prompt_action}))
        for offset, (action, payload) in enumerate(events):
            yield ({"ts": now + timedelta(milliseconds=40 * offset), "action": action, "key_id": key_id,
                    "team": team, "job_id": job_id, "payload": payload}, job if offset == 0 else None)
        emitted += len(events)


def _pick(action: str, rng: random.Random, weights: list[int]) -> tuple[str, str]:
    candidates = [(r, a, w) for r, a, w in RULES if a == action] or [(r, a, w) for r, a, w in RULES]
    rule, rule_action, _ = rng.choices(candidates, weights=[w for *_, w in candidates])[0]
    return rule, rule_action


def seed(sessions: Any, n_events: int, revision: str) -> float:
    """Insert `n_events` chained events (and their jobs) in one transaction; returns seconds."""
    started = time.perf_counter()
    with sessions() as session, session.begin():
        head = lock_chain_head(session)
        seq, prev = head.seq, head.hash
        events: list[dict[str, Any]] = []
        jobs: list[dict[str, Any]] = []

        def flush() -> None:
            if jobs:
                session.execute(insert(Job.__table__), jobs)
            if events:
                session.execute(insert(AuditEvent.__table__), events)
            jobs.clear()
            events.clear()

        for fields, job in synthetic_history(n_events, revision):
            if job is not None:
                jobs.append(job)
            seq += 1
            # As audit.log.append_event: the payload is stored as the canonical JSON that is hashed.
            body = {"seq": seq, "id": str(uuid.uuid4()), **fields,
                    "payload": json.loads(canonical_json(fields["payload"]))}
            digest = event_hash(prev, body)
            events.append({**body, "prev_hash": prev, "hash": digest})
            prev = digest
            if len(events) >= BATCH:
                flush()
        flush()
        session.execute(update(ChainHead).where(ChainHead.id == head.id).values(seq=seq, hash=prev))
    with sessions() as session, session.begin():
        # What autovacuum (PostgreSQL) or `PRAGMA optimize` would do soon after a bulk load: fresh planner stats.
        session.execute(text("ANALYZE"))
    return time.perf_counter() - started


def measure(client: Any, path: str, repeat: int) -> tuple[float, float, float, int]:
    """(first render ms, median ms, worst ms of `repeat` renders after it, status)."""
    t0 = time.perf_counter()
    client.get(path)
    first = (time.perf_counter() - t0) * 1000
    times = []
    status = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        status = response.status_code
    return first, statistics.median(times), max(times), status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file in a temp dir")
    parser.add_argument("--verify", action="store_true", help="also verify the whole chain once")
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from gateway.auth import create_key
    from gateway.main import create_app
    from gateway.settings import Settings
    from gateway.state import build_state, close_state

    data_dir = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    overrides: dict[str, Any] = {"database_url": args.database_url} if args.database_url else {}
    settings = Settings(_env_file=None, env="test", data_dir=data_dir, session_secret="bench-session-secret",
                        models_dir=REPO / "models", log_json=False, device="cpu", **overrides)
    upgrade_database(settings.database_url)
    state = build_state(settings)
    revision = state.ctx.policies.active_revision().revision
    sessions = make_session_factory(make_engine(settings.database_url))
    seconds = seed(sessions, args.events, revision)
    print(f"seeded {args.events:,} chained events in {seconds:.1f} s ({args.events / seconds:,.0f} events/s) "
          f"on {settings.database_url.split(':')[0]}")

    client = TestClient(create_app(settings, state=state))
    with client:
        with state.ctx.sessions() as session, session.begin():
            key = create_key(session, role="admin", team="compliance", name="bench")
        form = client.get("/dashboard/login").text
        token = re.search(r'name="login_token" value="([^"]+)"', form)
        assert token is not None
        client.post("/dashboard/login", data={"api_key": key, "login_token": token.group(1)})
        with sessions() as session:
            middle = session.get(AuditEvent, args.events // 2)
            assert middle is not None
            event_path = f"/dashboard/audit/events/{middle.id}"
            older = f"/dashboard/audit?before={args.events // 2}"
        pages = [("overview, last 24h", "/dashboard/overview?window=24h"),
                 ("overview, last 7 days", "/dashboard/overview?window=7d"),
                 ("overview, last 30 days", "/dashboard/overview?window=30d"),
                 ("audit log, newest 50", "/dashboard/audit"),
                 ("audit log, older page (keyset)", older),
                 ("audit log, team + event filter", "/dashboard/audit?team=ads&action=prompt.screened"),
                 ("audit log, model filter", "/dashboard/audit?model=llamagen-t2i-xl"),
                 ("audit log, rule filter", "/dashboard/audit?rule=weapons_making"),
                 ("audit log, text search", "/dashboard/audit?q=manifest"),
                 ("audit log, time window", "/dashboard/audit?since=2000-01-01T00:00&until=2000-01-02T00:00"),
                 ("event detail (chain position)", event_path),
                 ("review queue", "/dashboard/review"),
                 ("policies", "/dashboard/policies"),
                 ("models", "/dashboard/models")]
        print(f"\n{'page':34} {'first ms':>9} {'median ms':>10} {'worst ms':>9} {'status':>6} {'median/300':>10}")
        worst_ratio = 0.0
        for label, path in pages:
            first, median, worst, status = measure(client, path, args.repeat)
            ratio = median / TARGET_MS
            worst_ratio = max(worst_ratio, ratio)
            print(f"{label:34} {first:9.1f} {median:10.1f} {worst:9.1f} {status:6d} {ratio:10.2f}")
        print("first = the first render in this process: for the overview, before its closed-bucket cache "
              "holds anything")
        for window in ("24h", "7d", "30d"):
            shown = re.search(r'Generation requests</div><div class="value">([\d,]+)<',
                              client.get(f"/dashboard/overview?window={window}").text)
            print(f"overview {window}: {shown.group(1) if shown else '?'} generation requests shown")
        print(f"\nslowest page median / target: {worst_ratio:.2f} "
              f"({'within' if worst_ratio <= 1 else 'OVER'} the {TARGET_MS:.0f} ms budget)")
        if args.verify:
            from audit.verify import verify_database

            t0 = time.perf_counter()
            with sessions() as session:
                report = verify_database(session)
            print(f"chain verification: {report.summary} ({time.perf_counter() - t0:.1f} s)")
    close_state(state)


if __name__ == "__main__":
    main()
