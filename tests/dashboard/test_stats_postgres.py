"""The overview and explorer queries on PostgreSQL (their SQL differs per dialect)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway import stats
from gateway.auth import Principal
from tests.dashboard import factories

pytestmark = pytest.mark.services
AUDITOR = Principal(key_id="auditor00001", role="auditor", team="compliance")


@pytest.fixture
def pg_state(gateway_factory):
    from tests.services import postgres_database

    with postgres_database("dashboard") as url:
        gateway = gateway_factory(database_url=url)
        factories.park_for_review(gateway.state, rule_id="trademarks")
        factories.blocked_prompt(gateway.state)
        factories.released_image(gateway.state)
        yield gateway.state
        gateway.state.ctx.sessions.kw["bind"].dispose()


def test_overview_on_postgresql_counts_outcomes_rules_and_volumes(pg_state) -> None:
    now = datetime.now(UTC)
    with pg_state.ctx.sessions() as session:
        data = stats.overview(session=session, principal=AUDITOR, since=now - timedelta(days=1),
                              until=now + timedelta(hours=1), bucket="hour")
    assert data.outcomes.counts == {"allow": 2, "flag": 0, "review": 1, "block": 1}
    assert {b.key: b.counts["review"] for b in data.by_rule} == {"trademarks": 1, "graphic_violence": 0}
    assert data.volumes["images_released"] == 1
    assert sum(point.total for point in data.series) == 4


def test_explorer_rule_filter_on_postgresql(pg_state) -> None:
    with pg_state.ctx.sessions() as session:
        page = stats.search_events(session=session, principal=AUDITOR,
                                   filters=stats.EventFilters(rule="trademarks"))
    assert [e["action"] for e in page.events] == ["prompt.screened"]
