"""The dashboard in Debian's Chromium (Playwright): what compliance staff do, end to end."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.dashboard import factories
from tests.dashboard.conftest import LiveGateway

pytestmark = pytest.mark.browser

ROLE_PAGES = [("admin", "Overview"), ("auditor", "Overview"), ("policy_admin", "Overview"),
              ("reviewer", "Review queue"), ("creator", "Models")]


def _active_source(live: LiveGateway) -> str:
    return str(live.state.ctx.policies.active_revision().source)


@pytest.mark.parametrize(("role", "heading"), ROLE_PAGES)
def test_each_role_signs_in_and_lands_on_its_start_page(page_for: Any, role: str, heading: str) -> None:
    page = page_for(role)
    assert page.get_by_role("heading", level=1).inner_text() == heading
    assert role in page.locator(".who").inner_text()


def test_signing_out_returns_to_the_sign_in_form(page_for: Any) -> None:
    page = page_for("auditor")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/dashboard/login$"))
    page.goto(page.url.replace("/login", "/audit"))
    assert page.get_by_label("API key").is_visible()


def test_auditor_filters_the_audit_log_by_rule(page_for: Any, live: LiveGateway) -> None:
    factories.park_for_review(live.state, rule_id="public_figures")
    wanted = factories.park_for_review(live.state, rule_id="trademarks")
    page = page_for("auditor")
    page.get_by_role("link", name="Audit log").click()
    page.get_by_label("Rule id").fill("trademarks")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"rule=trademarks"))
    rows = page.locator("#results tbody tr")
    rows.first.wait_for()
    assert rows.count() == 1
    assert "trademarks" in rows.first.inner_text() and wanted[:8] in rows.first.inner_text()


def test_auditor_opens_an_event_and_sees_its_signed_image(page_for: Any, live: LiveGateway) -> None:
    factories.released_image(live.state)
    page = page_for("auditor")
    page.get_by_role("link", name="Audit log").click()
    page.get_by_label("Event", exact=True).select_option("image.released")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"action=image.released"))
    page.locator("#results").get_by_role("link", name="image.released").click()
    image = page.get_by_role("img", name=re.compile("Image 0 of generation"))
    image.wait_for()
    assert page.evaluate("img => img.complete && img.naturalWidth > 0", image.element_handle())
    assert page.get_by_text("Valid signature · trusted signer").is_visible()
    assert "Links verified" in page.locator(".badge.linked").inner_text()


def test_reviewer_approves_one_item_and_rejects_another(page_for: Any, live: LiveGateway) -> None:
    first = factories.park_for_review(live.state, prompt="a portrait of a famous senator")
    second = factories.park_for_review(live.state, prompt="a cartoon mouse with round ears", rule_id="trademarks")
    page = page_for("reviewer")

    item = page.locator("article", has_text=first[:8])
    item.get_by_label("Reason (required)").fill("public figure is the client, consent on file")
    item.get_by_role("button", name="Approve").click()
    page.get_by_role("status").wait_for()
    assert f"approved {first[:8]}" in page.get_by_role("status").inner_text()

    item = page.locator("article", has_text=second[:8])
    item.get_by_role("button", name="Reject").click()  # no reason: the browser refuses to submit
    assert item.get_by_label("Reason (required)").evaluate("field => !field.validity.valid")
    item.get_by_label("Reason (required)").fill("trademarked character")
    item.get_by_role("button", name="Reject").click()
    page.get_by_text("Nothing is waiting for review.").wait_for()
    with live.state.ctx.sessions() as session:
        from audit.models import Job

        assert session.get(Job, second).status == "blocked"


def test_policy_admin_sees_the_field_path_and_line_of_an_error(page_for: Any, live: LiveGateway) -> None:
    broken = _active_source(live).replace("    limit: 2000", "    limitt: 2000")
    page = page_for("policy_admin")
    page.goto(f"{live.url}/dashboard/policies/edit")
    page.get_by_label("Policy YAML").fill(broken)
    page.get_by_role("button", name="Validate").click()
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "prompt.max_length.limitt" in alert.inner_text()
    assert "line 18" in alert.inner_text()
    assert page.get_by_label("Policy YAML").get_attribute("aria-invalid") == "true"


def test_activated_policy_revision_is_carried_by_new_decisions(page_for: Any, live: LiveGateway) -> None:
    page = page_for("policy_admin")
    page.goto(f"{live.url}/dashboard/policies/edit")
    page.get_by_label("Policy YAML").fill(_active_source(live).replace('version: "1.2.1"', 'version: "1.2.2"'))
    page.get_by_label("Reason for this revision").fill("tighten review of trademarks")
    page.get_by_label("Activate when saved").check()
    page.get_by_role("button", name="Save revision").click()
    page.wait_for_url(re.compile(r"/dashboard/policies/sha256:"))
    assert page.locator("h1 .badge.allow").inner_text() == "active"
    revision = page.url.rsplit("/", 1)[1]

    creator = live.key("creator", team="ads")
    decision = httpx.post(f"{live.url}/v1/moderations", headers={"Authorization": f"Bearer {creator}"},
                          json={"prompt": "a blue circle on white"}, timeout=120).json()
    assert decision["policy_revision"] == revision

    auditor = page_for("auditor")
    auditor.goto(f"{live.url}/dashboard/audit?action=moderation.screened")
    auditor.locator("#results").get_by_role("link", name="moderation.screened").first.click()
    assert revision in auditor.locator("dl.kv").first.inner_text()


def test_sign_in_and_the_skip_link_work_from_the_keyboard(browser: Any, live: LiveGateway) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{live.url}/dashboard/login")
        page.keyboard.type(live.key("auditor"))  # the key field has focus on arrival
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r"/dashboard/overview"))
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        page.keyboard.press("Enter")
        assert page.evaluate("document.activeElement.id") == "content"
    finally:
        context.close()


def test_every_form_field_on_the_main_pages_has_a_label(page_for: Any, live: LiveGateway) -> None:
    factories.park_for_review(live.state)
    page = page_for("admin")
    unlabelled: dict[str, list[str]] = {}
    for path in ("/overview", "/audit", "/review", "/policies", "/policies/edit", "/provenance"):
        page.goto(f"{live.url}/dashboard{path}")
        missing = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
            .filter(el => el.type !== 'hidden' && el.labels.length === 0 && !el.getAttribute('aria-label'))
            .map(el => el.name || el.id)""")
        if missing:
            unlabelled[path] = missing
    assert unlabelled == {}


def test_main_pages_run_without_script_errors_or_blocked_resources(page_for: Any, live: LiveGateway) -> None:
    factories.released_image(live.state)
    page = page_for("admin")
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
    for path in ("/overview", "/audit", "/review", "/policies", "/models", "/provenance"):
        page.goto(f"{live.url}/dashboard{path}")
        page.wait_for_load_state("networkidle")
    assert page.goto(f"{live.url}/dashboard/overview") is not None
    page.wait_for_function("() => window.Chart && window.htmx")
    drawn = page.evaluate("() => [...document.querySelectorAll('canvas[data-chart]')].map(c => !!Chart.getChart(c))")
    assert drawn == [True, True, True, True]
    assert problems == []
