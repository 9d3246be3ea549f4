"""Overview aggregates, audit explorer queries and event detail (gateway/stats.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway import stats
from gateway.auth import Principal
from gateway.errors import Forbidden, InvalidRequest
from tests.dashboard import factories

AUDITOR = Principal(key_id="auditor00001", role="auditor", team="compliance")
DAY = timedelta(days=1)


@pytest.fixture
def history(gateway):
    """Two reviews (ads), one block (ads), one released image (design)."""
    state = gateway.state
    reviews = [factories.park_for_review(state), factories.park_for_review(state, rule_id="trademarks")]
    ids = {"review": reviews, "block": factories.blocked_prompt(state),
           "image": factories.released_image(state)}
    return state, ids


def _overview(state, **kwargs):
    now = datetime.now(UTC)
    with state.ctx.sessions() as session:
        return stats.overview(session=session, principal=AUDITOR, since=now - DAY, until=now + DAY, **kwargs)


def test_overview_counts_each_outcome_of_decision_events(history) -> None:
    state, _ = history
    data = _overview(state)
    # prompt screenings: review, review, block, allow; output screening: allow
    assert data.outcomes.counts == {"allow": 2, "flag": 0, "review": 2, "block": 1}
    assert data.volumes["images_released"] == 1


def test_overview_breaks_decisions_down_by_team_and_model(history) -> None:
    state, _ = history
    data = _overview(state)
    teams = {b.key: b.counts for b in data.by_team}
    assert teams["ads"]["review"] == 2 and teams["ads"]["block"] == 1
    assert teams["design"]["allow"] == 2
    assert {b.key for b in data.by_model} == {factories.MODEL}


def test_overview_counts_rule_firings_by_the_action_they_asked_for(history) -> None:
    state, _ = history
    rules = {b.key: b.counts for b in _overview(state).by_rule}
    assert rules["public_figures"]["review"] == 1
    assert rules["trademarks"]["review"] == 1
    assert rules["graphic_violence"]["block"] == 1


def test_overview_series_has_every_hour_of_the_window_including_empty_ones(history) -> None:
    state, _ = history
    data = _overview(state, bucket="hour")
    assert len(data.series) in (48, 49)  # the window starts at the top of an hour
    assert sum(point.total for point in data.series) == 5
    assert [p.key for p in data.series] == sorted(p.key for p in data.series)


def test_overview_serves_closed_buckets_from_the_cache(history) -> None:
    state, _ = history
    cache = stats.OverviewCache()
    now = datetime.now(UTC)
    later = now + 2 * DAY  # from then on, every bucket of the window is closed
    with state.ctx.sessions() as session:
        first = stats.overview(session=session, principal=AUDITOR, since=now - DAY, until=now + DAY,
                               cache=cache, now=later)
    factories.blocked_prompt(state)  # lands in a bucket the cache already holds
    with state.ctx.sessions() as session:
        second = stats.overview(session=session, principal=AUDITOR, since=now - DAY, until=now + DAY,
                                cache=cache, now=later)
    # every bucket but the last, which `until` cuts short, comes from the cache the second time
    assert first.buckets_from_cache == 0 and second.buckets_from_cache == len(second.series) - 1
    assert second.outcomes.counts == first.outcomes.counts


def test_overview_rescans_buckets_that_are_still_open(history) -> None:
    state, _ = history
    cache = stats.OverviewCache()
    before = _overview(state, cache=cache)
    factories.blocked_prompt(state)
    after = _overview(state, cache=cache)
    assert after.outcomes.counts["block"] == before.outcomes.counts["block"] + 1


def test_overview_ignores_events_outside_the_window(history) -> None:
    state, _ = history
    later = datetime.now(UTC) + 2 * DAY
    with state.ctx.sessions() as session:
        data = stats.overview(session=session, principal=AUDITOR, since=later, until=later + DAY)
    assert data.outcomes.total == 0 and data.by_rule == []


def test_overview_refuses_an_empty_window(history) -> None:
    state, _ = history
    now = datetime.now(UTC)
    with state.ctx.sessions() as session, pytest.raises(InvalidRequest, match="empty time window"):
        stats.overview(session=session, principal=AUDITOR, since=now, until=now)


def test_overview_is_refused_to_creators(history) -> None:
    state, _ = history
    creator = Principal(key_id="c", role="creator", team="ads")
    now = datetime.now(UTC)
    with state.ctx.sessions() as session, pytest.raises(Forbidden):
        stats.overview(session=session, principal=creator, since=now - DAY, until=now)


def _search(state, **filters):
    with state.ctx.sessions() as session:
        return stats.search_events(session=session, principal=AUDITOR, filters=stats.EventFilters(**filters))


def test_search_by_rule_finds_only_decisions_that_name_it(history) -> None:
    state, ids = history
    page = _search(state, rule="trademarks")
    assert [(e["action"], e["job_id"]) for e in page.events] == [("prompt.screened", ids["review"][1])]
    assert page.events[0]["rules"] == ["trademarks"]


def test_search_by_team_and_action_combines_filters(history) -> None:
    state, _ = history
    page = _search(state, team="ads", action="prompt.screened")
    assert [e["outcome"] for e in page.events] == ["block", "review", "review"]


def test_search_by_text_matches_payload_and_ids(history) -> None:
    state, ids = history
    assert {e["job_id"] for e in _search(state, text="FAMOUS SENATOR").events} == set(ids["review"])
    assert {e["job_id"] for e in _search(state, text=ids["block"]).events} == {ids["block"]}


def test_search_text_treats_like_wildcards_literally(history) -> None:
    state, _ = history
    assert _search(state, text="%").events == []


def test_search_by_model_uses_the_job_model(history) -> None:
    state, _ = history
    assert _search(state, model="no-such-model").events == []
    assert len(_search(state, model=factories.MODEL, action="image.released").events) == 1


def test_search_pages_with_a_seq_cursor_without_overlap(history) -> None:
    state, _ = history
    with state.ctx.sessions() as session:
        everything = stats.EventFilters()
        first = stats.search_events(session=session, principal=AUDITOR, filters=everything, limit=3)
        second = stats.search_events(session=session, principal=AUDITOR, filters=everything, limit=3,
                                     before=first.next_before)
    seqs = [e["seq"] for e in first.events] + [e["seq"] for e in second.events]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == 6


def test_event_detail_verifies_links_before_any_checkpoint(history) -> None:
    state, ids = history
    with state.ctx.sessions() as session:
        event_id = stats.search_events(session=session, principal=AUDITOR,
                                       filters=stats.EventFilters(action="image.released")).events[0]["id"]
        detail = stats.event_detail(session=session, principal=AUDITOR, event_id=event_id)
    assert detail.chain.state == "linked"
    assert "no signed checkpoint covers this event yet" in detail.chain.explanation
    assert detail.job is not None and detail.job.id == ids["image"][0]
    assert [r["action"] for r in detail.related][-1] == "generation.completed"


def test_event_detail_is_anchored_once_a_signed_checkpoint_covers_it(history) -> None:
    state, _ = history
    state.checkpoints.tick(force=True)
    with state.ctx.sessions() as session:
        first = stats.search_events(session=session, principal=AUDITOR, filters=stats.EventFilters(),
                                    limit=500).events[-1]
        detail = stats.event_detail(session=session, principal=AUDITOR, event_id=first["id"])
    assert detail.chain.state == "anchored", detail.chain.explanation
    assert detail.chain.verified.ok


def test_filter_choices_list_each_action_and_team_once_in_order(history) -> None:
    state, _ = history
    with state.ctx.sessions() as session:
        actions = stats.event_actions(session=session, principal=AUDITOR)
        teams = stats.event_teams(session=session, principal=AUDITOR)
    assert actions == sorted(set(actions)) and {"prompt.screened", "image.released"} <= set(actions)
    assert teams == sorted(set(teams)) and {"ads", "design"} <= set(teams)


def test_payload_filters_scan_a_bounded_span_and_offer_the_older_one(history) -> None:
    state, ids = history
    with state.ctx.sessions() as session:
        head = stats.search_events(session=session, principal=AUDITOR, filters=stats.EventFilters(),
                                   limit=1).events[0]["seq"]
        newest = stats.search_events(session=session, principal=AUDITOR, scan_span=3,
                                     filters=stats.EventFilters(rule="public_figures"))
        older = stats.search_events(session=session, principal=AUDITOR, scan_span=head,
                                    filters=stats.EventFilters(rule="public_figures"), before=newest.next_before)
    assert newest.events == [] and newest.searched == (head - 2, head)
    assert newest.next_before == head - 2
    assert [e["job_id"] for e in older.events] == [ids["review"][0]]
    assert older.next_before is None
