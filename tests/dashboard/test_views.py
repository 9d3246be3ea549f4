"""Dashboard pages over HTTP: sign-in, sessions, CSRF, role checks and the governance actions."""

from __future__ import annotations

import re

import pytest

from audit.models import AuditEvent
from gateway.auth import revoke_key
from tests.dashboard import factories
from tests.dashboard.conftest import Dashboard

DEFAULT_VERSION = 'version: "1.2.1"'


def _key_id(key: str) -> str:
    return key.split("_")[1]


def _events(dash: Dashboard, action: str) -> list[AuditEvent]:
    from sqlalchemy import select

    with dash.state.ctx.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)
                                    .order_by(AuditEvent.seq)))


def _active_source(dash: Dashboard) -> str:
    return str(dash.state.ctx.policies.active_revision().source)


def test_pages_redirect_to_sign_in_and_remember_where_to_return(dash: Dashboard) -> None:
    response = dash.client.get("/dashboard/audit?team=ads", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/login?next=/dashboard/audit%3Fteam%3Dads"


def test_sign_in_sets_an_httponly_strict_session_cookie_without_the_key(dash: Dashboard) -> None:
    key = dash.gateway.key("auditor")
    response = dash.submit_login(key)
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("lgw_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
    assert key.split("_", 2)[2] not in cookie


def test_sign_in_with_an_unknown_key_shows_why(dash: Dashboard) -> None:
    response = dash.submit_login("lgw_000000000000_not-a-real-secret")
    assert response.status_code == 401
    assert "Sign-in failed: unknown API key" in response.text


def test_sign_in_without_the_form_token_is_refused(dash: Dashboard) -> None:
    key = dash.gateway.key("auditor")
    response = dash.client.post("/dashboard/login", data={"api_key": key, "login_token": "x.y"},
                                follow_redirects=False)
    assert response.status_code == 400
    assert "lgw_session" not in response.headers.get("set-cookie", "")


HOMES = [("admin", "/dashboard/overview"), ("auditor", "/dashboard/overview"),
         ("policy_admin", "/dashboard/overview"), ("reviewer", "/dashboard/review"),
         ("creator", "/dashboard/models")]


@pytest.mark.parametrize(("role", "home"), HOMES)
def test_sign_in_lands_each_role_on_its_start_page(dash: Dashboard, role: str, home: str) -> None:
    response = dash.submit_login(dash.gateway.key(role))
    assert response.headers["location"] == home


def test_sign_in_returns_to_the_page_that_asked_for_it(dash: Dashboard) -> None:
    response = dash.submit_login(dash.gateway.key("auditor"), next_path="/dashboard/audit?team=ads")
    assert response.headers["location"] == "/dashboard/audit?team=ads"


def test_sign_in_never_redirects_off_the_dashboard(dash: Dashboard) -> None:
    response = dash.submit_login(dash.gateway.key("auditor"), next_path="https://evil.example/")
    assert response.headers["location"] == "/dashboard/overview"


def test_revoking_a_key_ends_its_dashboard_session(dash: Dashboard) -> None:
    key = dash.sign_in("auditor")
    with dash.state.ctx.sessions() as session, session.begin():
        revoke_key(session, _key_id(key))
    response = dash.client.get("/dashboard/audit", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/dashboard/login")


def test_sign_out_ends_the_session_even_for_a_copy_of_its_cookie(dash: Dashboard) -> None:
    dash.sign_in("auditor")
    copied = dash.client.cookies.get("lgw_session")
    csrf = dash.csrf()
    assert dash.post("/dashboard/logout", {}).status_code == 303
    assert dash.client.get("/dashboard/audit", follow_redirects=False).status_code == 303
    dash.client.cookies.set("lgw_session", copied, path="/dashboard")  # as someone who copied it would
    response = dash.client.get("/dashboard/audit", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/dashboard/login")
    refused = dash.client.post("/dashboard/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert refused.headers["location"].startswith("/dashboard/login")  # signed out already: no session to use


def test_signing_out_of_one_session_leaves_the_keys_other_sessions_alone(dash: Dashboard) -> None:
    key = dash.sign_in("auditor")
    other = dash.client.cookies.get("lgw_session")
    dash.client.cookies.clear()
    assert dash.submit_login(key).status_code == 303
    assert dash.post("/dashboard/logout", {}).status_code == 303
    dash.client.cookies.set("lgw_session", other, path="/dashboard")
    assert dash.client.get("/dashboard/audit", follow_redirects=False).status_code == 200


def test_a_form_post_without_the_csrf_token_is_refused(dash: Dashboard) -> None:
    dash.sign_in("reviewer")
    job_id = factories.park_for_review(dash.state)
    response = dash.client.post(f"/dashboard/review/{job_id}", data={"decision": "approve", "reason": "fine"})
    assert response.status_code == 403
    assert "CSRF token" in response.text
    assert _events(dash, "review.decided") == []


def test_a_creator_is_shown_a_403_page_for_the_audit_log(dash: Dashboard) -> None:
    dash.sign_in("creator")
    response = dash.client.get("/dashboard/audit")
    assert response.status_code == 403
    assert "role &#39;creator&#39; may not do this" in response.text


def test_navigation_lists_only_the_pages_a_role_may_open(dash: Dashboard) -> None:
    dash.sign_in("reviewer")
    nav = re.search(r'<nav class="main".*?</nav>', dash.client.get("/dashboard/review").text, re.S)
    assert nav is not None
    labels = re.findall(r">([A-Z][a-z]+(?: [a-z]+)?)</a>", nav.group(0))
    assert labels == ["Review queue", "Models", "Provenance"]


def test_pages_carry_a_content_security_policy_without_inline_script(dash: Dashboard) -> None:
    dash.sign_in("auditor")
    response = dash.client.get("/dashboard/overview")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert "<script>" not in response.text


def test_audit_explorer_answers_htmx_with_the_results_table_only(dash: Dashboard) -> None:
    factories.park_for_review(dash.state, team="ads")
    dash.sign_in("auditor")
    response = dash.client.get("/dashboard/audit", params={"team": "ads"},
                               headers={"HX-Request": "true", "HX-Target": "results"})
    assert response.status_code == 200
    assert "<html" not in response.text and "prompt.screened" in response.text


def test_audit_explorer_says_in_the_htmx_results_which_bound_it_could_not_apply(dash: Dashboard) -> None:
    dash.sign_in("auditor")
    response = dash.client.get("/dashboard/audit", params={"since": "2026-13-01T00:00", "team": "ads"},
                               headers={"HX-Request": "true", "HX-Target": "results"})
    assert response.status_code == 200 and "<html" not in response.text
    assert 'role="alert">Not applied: since: ' in response.text


def test_audit_explorer_paging_keeps_the_page_size(dash: Dashboard) -> None:
    for _ in range(3):
        factories.park_for_review(dash.state, team="ads")
    dash.sign_in("auditor")
    page = dash.client.get("/dashboard/audit", params={"team": "ads", "limit": 2})
    older = re.search(r'href="(/dashboard/audit\?[^"]*before=\d+[^"]*)"', page.text)
    assert older is not None and "limit=2" in older.group(1)


@pytest.mark.parametrize("path,named", [("/dashboard/audit?limit=0", "query.limit: "),
                                        ("/dashboard/review?offset=-1", "query.offset: "),
                                        ("/dashboard/policies/diff", "query.a: Field required")])
def test_a_dashboard_parameter_out_of_range_gets_the_error_page_not_json(dash: Dashboard, path: str,
                                                                         named: str) -> None:
    dash.sign_in("admin")
    response = dash.client.get(path)
    assert response.status_code == 422 and response.headers["content-type"].startswith("text/html")
    assert "Cannot accept this" in response.text and named in response.text
    assert "<nav" in response.text  # the signed-in page, with its menu


def test_audit_explorer_names_a_bad_date_at_its_field(dash: Dashboard) -> None:
    dash.sign_in("auditor")
    response = dash.client.get("/dashboard/audit", params={"since": "yesterday"})
    assert 'id="since-error"' in response.text and "is not a date and time" in response.text


def test_audit_explorer_names_a_date_out_of_range_in_utc_at_its_field(dash: Dashboard) -> None:
    dash.sign_in("auditor")
    response = dash.client.get("/dashboard/audit", params={"until": "0001-01-01T00:00:00+01:00"})
    assert response.status_code == 200  # the form again, with the error at its field (was a 500)
    assert 'id="until-error"' in response.text and "out of range once converted to UTC" in response.text


def test_event_page_shows_the_image_with_a_provenance_badge(dash: Dashboard) -> None:
    job_id, event_id = factories.released_image(dash.state)
    dash.sign_in("auditor")
    page = dash.client.get(f"/dashboard/audit/events/{event_id}").text
    assert f'src="/dashboard/generations/{job_id}/images/0"' in page
    assert "Valid signature · trusted signer" in page
    assert "the file&#39;s SHA-256 matches the audit record" in page
    image = dash.client.get(f"/dashboard/generations/{job_id}/images/0")
    assert image.headers["content-type"] == "image/png"


def test_event_page_of_a_tampered_image_shows_the_event_and_says_the_file_does_not_match(dash: Dashboard) -> None:
    from pathlib import Path

    job_id, event_id = factories.released_image(dash.state)
    (stored,) = (Path(dash.state.ctx.artifacts.root) / job_id).glob("0-*.png")
    stored.write_bytes(stored.read_bytes() + b"tampered")
    dash.sign_in("auditor")
    response = dash.client.get(f"/dashboard/audit/events/{event_id}")
    assert response.status_code == 200 and "does NOT match the audit record" in response.text
    assert dash.client.get(f"/dashboard/generations/{job_id}/images/0").status_code == 503  # withheld


def test_event_page_of_an_image_the_store_lost_says_so(dash: Dashboard) -> None:
    from pathlib import Path

    job_id, event_id = factories.released_image(dash.state)
    (stored,) = (Path(dash.state.ctx.artifacts.root) / job_id).glob("0-*.png")
    stored.unlink()
    dash.sign_in("auditor")
    response = dash.client.get(f"/dashboard/audit/events/{event_id}")
    assert response.status_code == 200 and "The stored image cannot be read" in response.text


def test_reviewer_must_give_a_reason(dash: Dashboard) -> None:
    job_id = factories.park_for_review(dash.state)
    dash.sign_in("reviewer")
    response = dash.post(f"/dashboard/review/{job_id}", {"decision": "reject", "reason": " "})
    assert response.status_code == 422
    assert f'id="reason-error-{job_id}"' in response.text
    assert _events(dash, "review.decided") == []


def test_a_review_reason_with_control_characters_is_refused_as_the_api_refuses_it(dash: Dashboard) -> None:
    job_id = factories.park_for_review(dash.state)
    dash.sign_in("reviewer")
    response = dash.post(f"/dashboard/review/{job_id}", {"decision": "approve", "reason": "looks fine\x00\x01 to me"})
    assert response.status_code == 422
    assert f'id="reason-error-{job_id}"' in response.text and "contains control characters" in response.text
    assert _events(dash, "review.decided") == []


def test_reviewer_sees_the_images_output_screening_held(dash: Dashboard) -> None:
    job_id = factories.park_with_held_image(dash.state)
    dash.sign_in("reviewer")
    page = dash.client.get("/dashboard/review")
    src = f"/dashboard/review/{job_id}/images/0"
    assert "Held images" in page.text and f'src="{src}"' in page.text
    image = dash.client.get(src)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    dash.sign_in("creator")
    assert dash.client.get(src).status_code == 403


def test_reviewer_rejection_is_audited_with_its_reason(dash: Dashboard) -> None:
    job_id = factories.park_for_review(dash.state)
    key = dash.sign_in("reviewer")
    response = dash.post(f"/dashboard/review/{job_id}",
                         {"decision": "reject", "reason": "likeness of a senator"})
    assert response.status_code == 303
    [event] = _events(dash, "review.decided")
    assert (event.job_id, event.key_id) == (job_id, _key_id(key))
    assert event.payload["reason"] == "likeness of a senator" and event.payload["decision"] == "reject"


def test_policy_with_a_misspelt_field_is_shown_with_its_path_and_line(dash: Dashboard) -> None:
    dash.sign_in("policy_admin")
    source = _active_source(dash).replace("    limit: 2000", "    limitt: 2000")
    response = dash.post("/dashboard/policies", {"source": source, "reason": "typo", "activate": "true"})
    assert response.status_code == 422
    assert '<code class="field-path">prompt.max_length.limitt</code>' in response.text
    assert 'href="#line-18">line 18</a>' in response.text
    assert '<li id="line-18" class="bad">' in response.text


def test_saving_and_activating_a_policy_records_the_reason(dash: Dashboard) -> None:
    dash.sign_in("policy_admin")
    source = _active_source(dash).replace(DEFAULT_VERSION, 'version: "1.2.2"')
    response = dash.post("/dashboard/policies",
                         {"source": source, "reason": "new version", "activate": "true"})
    assert response.status_code == 303
    active = dash.state.ctx.policies.active_revision()
    assert active.version == "1.2.2"
    assert response.headers["location"] == f"/dashboard/policies/{active.revision}"
    assert _events(dash, "policy.activated")[-1].payload["reason"] == "new version"


def test_activating_an_older_revision_needs_a_reason(dash: Dashboard) -> None:
    dash.sign_in("policy_admin")
    original = dash.state.ctx.policies.active_revision().revision
    source = _active_source(dash).replace(DEFAULT_VERSION, 'version: "1.2.2"')
    dash.post("/dashboard/policies", {"source": source, "reason": "new version", "activate": "true"})
    refused = dash.post(f"/dashboard/policies/{original}/activate", {"reason": ""})
    assert refused.status_code == 422 and 'id="activate-error"' in refused.text
    accepted = dash.post(f"/dashboard/policies/{original}/activate", {"reason": "roll back"})
    assert accepted.status_code == 303
    assert dash.state.ctx.policies.active_revision().revision == original


def test_policy_diff_pairs_the_changed_line(dash: Dashboard) -> None:
    dash.sign_in("policy_admin")
    old = dash.state.ctx.policies.active_revision().revision
    source = _active_source(dash).replace(DEFAULT_VERSION, 'version: "1.2.2"')
    saved = dash.post("/dashboard/policies", {"source": source, "reason": "bump"})
    new = saved.headers["location"].rsplit("/", 1)[1]
    page = dash.client.get("/dashboard/policies/diff", params={"a": old, "b": new}).text
    assert "1 changed line(s)" in page
    changed = r'<tr class="changed">.*?version: &#34;1.2.1&#34;.*?version: &#34;1.2.2&#34;'
    assert re.search(changed, page, re.S)


def test_provenance_upload_explains_an_unsigned_image(dash: Dashboard) -> None:
    dash.sign_in("creator")
    response = dash.client.post("/dashboard/provenance", data={"csrf_token": dash.csrf()},
                                files={"image": ("plain.png", factories.png_bytes(), "image/png")})
    assert response.status_code == 200
    assert "No provenance" in response.text and "no C2PA manifest found" in response.text


def test_dry_run_reports_how_many_stored_decisions_would_change(dash: Dashboard) -> None:
    factories.park_for_review(dash.state)
    factories.blocked_prompt(dash.state)
    dash.sign_in("policy_admin")
    source = _active_source(dash).replace(DEFAULT_VERSION, 'version: "1.2.2"')
    response = dash.post("/dashboard/policies/dry-run", {"source": source, "reason": ""})
    assert response.status_code == 200
    assert re.search(r"<strong>\d+ of 2</strong> recent stored decisions would change", response.text)
    assert dash.state.ctx.policies.active_revision().version == "1.2.1"  # nothing stored or activated


def test_dry_run_of_an_invalid_policy_shows_its_problems(dash: Dashboard) -> None:
    dash.sign_in("auditor")
    response = dash.post("/dashboard/policies/dry-run", {"source": "id: x\nversion: 1\nbogus: true\n"})
    assert response.status_code == 422
    assert '<code class="field-path">bogus</code>' in response.text
