"""Overview aggregates: volumes and allow/flag/review/block counts over time, by team, model and rule.

Each query is bounded by a time window on the indexed `ts` column and grouped by time bucket. Audit events
are append-only and stamped when appended, so the totals of a bucket that ended a while ago never change:
`OverviewCache` keeps them, and a warm overview only scans the buckets that are still open.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.orm import Session

from gateway.auth import Principal
from gateway.errors import InvalidRequest

# Events that carry a policy decision in `payload.action` (and the rules that fired in `payload.screenings`).
DECISION_ACTIONS = ("prompt.screened", "output.screened", "moderation.screened")
VOLUME_ACTIONS = {"generation.requested": "requests", "image.released": "images_released",
                  "moderation.screened": "moderations", "review.decided": "reviews"}
OUTCOMES = ("allow", "flag", "review", "block")
Bucket = Literal["hour", "day"]
BUCKET_STEP = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
MAX_WINDOW = timedelta(days=366)
# A bucket counts as closed this long after it ends: room for a writer whose clock runs a little behind.
SETTLE = timedelta(minutes=10)

_IN_DECISIONS = "('prompt.screened', 'output.screened', 'moderation.screened')"
_IN_VOLUMES = "('generation.requested', 'image.released', 'moderation.screened', 'review.decided')"
# Per dialect: the bucket label of e.ts, and the action column as the WHERE clause should see it. On SQLite,
# `+e.action` keeps the planner on the ts index (a window) instead of the action index (the whole log).
_DIALECTS: dict[str, dict[str, Any]] = {
    "sqlite": {"period": "strftime(:fmt, e.ts)", "action": "+e.action",
               "fmt": {"day": "%Y-%m-%d", "hour": "%Y-%m-%d %H:00"}},
    "postgresql": {"period": "to_char(date_trunc(:unit, timezone('UTC', e.ts)), :fmt)", "action": "e.action",
                   "fmt": {"day": "YYYY-MM-DD", "hour": "YYYY-MM-DD HH24:00"}},
}
_JSON: dict[str, dict[str, str]] = {
    "sqlite": {"outcome": "json_extract(e.payload, '$.action')",
               "model": "coalesce(j.model, json_extract(e.payload, '$.context.model'), "
                        "json_extract(e.payload, '$.model'), '(none)')",
               "reasons": "json_each(e.payload, '$.screenings') AS s, json_each(s.value, '$.decision.reasons') AS r",
               "rule": "json_extract(r.value, '$.rule_id')", "rule_action": "json_extract(r.value, '$.action')"},
    "postgresql": {"outcome": "e.payload ->> 'action'",
                   "model": "coalesce(j.model, e.payload -> 'context' ->> 'model', e.payload ->> 'model', "
                            "'(none)')",
                   "reasons": "json_array_elements(e.payload -> 'screenings') AS s(value), "
                              "json_array_elements(s.value -> 'decision' -> 'reasons') AS r(value)",
                   "rule": "r.value ->> 'rule_id'", "rule_action": "r.value ->> 'action'"},
}


def _queries(dialect: str) -> dict[str, str]:
    d, j = _DIALECTS[dialect], _JSON[dialect]
    window = "e.ts >= :since AND e.ts < :until"
    return {
        "decisions": f"""
            SELECT {d['period']} AS period, e.team, {j['model']} AS model, {j['outcome']} AS outcome, count(*)
            FROM audit_events AS e LEFT JOIN jobs AS j ON j.id = e.job_id
            WHERE {window} AND {d['action']} IN {_IN_DECISIONS}
            GROUP BY 1, 2, 3, 4""",
        # The window's non-allow decisions first (MATERIALIZED: the planner must not unnest the whole log).
        "rules": f"""
            WITH decided AS MATERIALIZED (
                SELECT e.ts, e.payload FROM audit_events AS e
                WHERE {window} AND {d['action']} IN {_IN_DECISIONS} AND {j['outcome']} != 'allow'
            )
            SELECT {d['period']} AS period, {j['rule']} AS rule_id, {j['rule_action']} AS outcome, count(*)
            FROM decided AS e, {j['reasons']}
            GROUP BY 1, 2, 3""",
        "volumes": f"""
            SELECT {d['period']} AS period, e.action, count(*)
            FROM audit_events AS e
            WHERE {window} AND {d['action']} IN {_IN_VOLUMES}
            GROUP BY 1, 2""",
    }


@dataclass
class Breakdown:
    """Decision counts for one team, model, rule or time bucket."""

    key: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def rate(self, outcome: str) -> float:
        """Share of `outcome` among this row's decisions (0.0 when there are none)."""
        return self.counts.get(outcome, 0) / self.total if self.total else 0.0

    def add(self, outcome: str, n: int) -> None:
        self.counts[outcome if outcome in OUTCOMES else "block"] += n  # unknown counts as the strictest


@dataclass
class Overview:
    """Volumes and decision outcomes in a time window."""

    since: datetime
    until: datetime
    bucket: Bucket
    volumes: dict[str, int]
    outcomes: Breakdown
    series: list[Breakdown]
    by_team: list[Breakdown]
    by_model: list[Breakdown]
    by_rule: list[Breakdown]
    buckets_from_cache: int = 0

    def chart_data(self) -> dict[str, Any]:
        """JSON for the browser charts (the same numbers as the tables beside them)."""

        def rows(items: list[Breakdown]) -> dict[str, Any]:
            return {"labels": [b.key for b in items],
                    "datasets": [[o, [b.counts[o] for b in items]] for o in OUTCOMES]}

        return {"series": rows(self.series), "team": rows(self.by_team), "model": rows(self.by_model),
                "rule": rows(self.by_rule)}


@dataclass
class BucketTotals:
    """Everything the overview needs from one time bucket."""

    decisions: list[tuple[str, str, str, int]] = field(default_factory=list)  # team, model, outcome, n
    rules: list[tuple[str, str, int]] = field(default_factory=list)  # rule id, outcome, n
    volumes: dict[str, int] = field(default_factory=dict)  # event action -> n


class OverviewCache:
    """Totals of closed buckets, per database and bucket size. Safe to share between threads."""

    def __init__(self, max_buckets: int = 20_000) -> None:
        self._store: dict[tuple[str, str, str], BucketTotals] = {}
        self._lock = threading.Lock()
        self._max = max_buckets

    def get(self, database: str, bucket: Bucket, label: str) -> BucketTotals | None:
        with self._lock:
            return self._store.get((database, bucket, label))

    def put(self, database: str, bucket: Bucket, label: str, totals: BucketTotals) -> None:
        with self._lock:
            if len(self._store) >= self._max:
                self._store.clear()  # a crude bound; closed buckets are cheap to recompute
            self._store[(database, bucket, label)] = totals

    def __len__(self) -> int:
        return len(self._store)


def _floor(moment: datetime, bucket: Bucket) -> datetime:
    moment = moment.astimezone(UTC)
    if bucket == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(minute=0, second=0, microsecond=0)


def _label(start: datetime, bucket: Bucket) -> str:
    return start.strftime("%Y-%m-%d" if bucket == "day" else "%Y-%m-%d %H:00")


def _buckets(since: datetime, until: datetime, bucket: Bucket) -> list[datetime]:
    starts, step = [], BUCKET_STEP[bucket]
    start = _floor(since, bucket)
    while start < until:
        starts.append(start)
        start += step
    return starts


def _check_window(since: datetime, until: datetime) -> None:
    if since.tzinfo is None or until.tzinfo is None:
        raise InvalidRequest("time window bounds must be timezone-aware")
    if until <= since:
        raise InvalidRequest(f"empty time window: until ({until.isoformat()}) is not after since "
                             f"({since.isoformat()})")
    if until - since > MAX_WINDOW:
        raise InvalidRequest(f"time window longer than {MAX_WINDOW.days} days; choose a shorter one")


def _sqlite_ts(moment: datetime) -> str:
    """A bound in the text form SQLAlchemy stores SQLite timestamps in (naive UTC, microseconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _scan(session: Session, dialect: str, bucket: Bucket, since: datetime,
          until: datetime) -> dict[str, BucketTotals]:
    """Totals per bucket label for events in [since, until)."""
    sqlite = dialect == "sqlite"
    params: dict[str, Any] = {
        "since": _sqlite_ts(since) if sqlite else since,
        "until": _sqlite_ts(until) if sqlite else until,
        "fmt": _DIALECTS[dialect]["fmt"][bucket], "unit": bucket}
    queries = _queries(dialect)
    found: dict[str, BucketTotals] = {}
    for period, team, model, outcome, n in session.execute(text(queries["decisions"]), params):
        found.setdefault(period, BucketTotals()).decisions.append((str(team), str(model), str(outcome), n))
    for period, rule, outcome, n in session.execute(text(queries["rules"]), params):
        found.setdefault(period, BucketTotals()).rules.append((str(rule), str(outcome), n))
    for period, action, n in session.execute(text(queries["volumes"]), params):
        found.setdefault(period, BucketTotals()).volumes[str(action)] = n
    return found


def overview(*, session: Session, principal: Principal, since: datetime, until: datetime,
             bucket: Bucket = "day", top: int = 12, cache: OverviewCache | None = None,
             now: datetime | None = None) -> Overview:
    """Decision outcomes and volumes from the start of `since`'s bucket until `until`.

    With a cache, closed buckets are read from it (and stored after the first scan); only the buckets
    that may still receive events are scanned.
    """
    principal.require("auditor", "policy_admin")
    _check_window(since, until)
    dialect = session.get_bind().dialect.name
    if dialect not in _DIALECTS:
        raise InvalidRequest(f"the overview supports SQLite and PostgreSQL, not {dialect}")
    starts = _buckets(since, until, bucket)
    closed_before = (now or datetime.now(UTC)) - SETTLE
    database = session.get_bind().engine.url.render_as_string(hide_password=True)

    totals: dict[str, BucketTotals] = {}
    missing: list[datetime] = []
    for start in starts:
        cached = cache.get(database, bucket, _label(start, bucket)) if cache is not None else None
        if cached is None:
            missing.append(start)
        else:
            totals[_label(start, bucket)] = cached
    if missing:
        scanned = _scan(session, dialect, bucket, missing[0], min(until, missing[-1] + BUCKET_STEP[bucket]))
        for start in missing:
            label = _label(start, bucket)
            found = scanned.get(label, BucketTotals())
            totals[label] = found
            if cache is not None and start + BUCKET_STEP[bucket] <= closed_before and start + \
                    BUCKET_STEP[bucket] <= until:
                cache.put(database, bucket, label, found)
    return _summarise(totals, starts, bucket, until, top, from_cache=len(starts) - len(missing))


def _summarise(totals: dict[str, BucketTotals], starts: Iterable[datetime], bucket: Bucket, until: datetime,
               top: int, from_cache: int) -> Overview:
    starts = list(starts)
    overall = Breakdown("all")
    series: list[Breakdown] = []
    teams: dict[str, Breakdown] = {}
    models: dict[str, Breakdown] = {}
    rules: dict[str, Breakdown] = {}
    volumes = dict.fromkeys(VOLUME_ACTIONS.values(), 0)
    for start in starts:
        label = _label(start, bucket)
        bucket_totals = totals.get(label, BucketTotals())
        point = Breakdown(label)
        for team, model, outcome, n in bucket_totals.decisions:
            point.add(outcome, n)
            overall.add(outcome, n)
            teams.setdefault(team, Breakdown(team)).add(outcome, n)
            models.setdefault(model, Breakdown(model)).add(outcome, n)
        for rule, outcome, n in bucket_totals.rules:
            rules.setdefault(rule, Breakdown(rule)).add(outcome, n)
        for action, n in bucket_totals.volumes.items():
            volumes[VOLUME_ACTIONS[action]] += n
        series.append(point)

    def ranked(table: dict[str, Breakdown]) -> list[Breakdown]:
        return sorted(table.values(), key=lambda b: (-b.total, b.key))[:top]

    return Overview(since=starts[0] if starts else until, until=until, bucket=bucket, volumes=volumes,
                    outcomes=overall, series=series, by_team=ranked(teams), by_model=ranked(models),
                    by_rule=ranked(rules), buckets_from_cache=from_cache)
