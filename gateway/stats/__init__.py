"""Read-only queries behind the compliance dashboard: overview aggregates, the audit explorer, event detail."""

from __future__ import annotations

from gateway.stats.aggregates import (
    DECISION_ACTIONS,
    OUTCOMES,
    Breakdown,
    Overview,
    OverviewCache,
    overview,
)
from gateway.stats.events import (
    ChainPosition,
    EventDetail,
    EventFilters,
    EventPage,
    event_actions,
    event_detail,
    event_teams,
    fired_rules,
    search_events,
)

__all__ = ["DECISION_ACTIONS", "OUTCOMES", "Breakdown", "ChainPosition", "EventDetail", "EventFilters",
           "EventPage", "Overview", "OverviewCache", "event_actions", "event_detail", "event_teams",
           "fired_rules", "overview", "search_events"]
