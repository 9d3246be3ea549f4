"""Bad input gets a clear 4xx with the error body, never a 500; limits answer 429 with Retry-After."""

from __future__ import annotations

import json

import pytest

from tests.conftest import LEXICAL_POLICY


@pytest.fixture
def gw(gateway_factory, tiny_models):
    return gateway_factory(models_dir=tiny_models, default_model="tiny-c2i",
                           policy_file=LEXICAL_POLICY)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return body["error"]


@pytest.mark.parametrize("payload,fragment", [
    ({"model": "no-such-model", "class_id": 1}, "unknown model"),
    ({"model": "tiny-c2i", "class_id": 10}, "out of range"),
    ({"model": "tiny-c2i", "prompt": "a red star"}, "class-conditional"),
    ({"model": "tiny-c2i", "class_id": 1, "params": {"top_p": 2}}, "top_p"),
    ({"model": "tiny-c2i", "class_id": 1, "params": {"num_images": 9}}, "num_images"),
    ({"model": "tiny-c2i", "prompt": "red\x00star", "class_id": 1}, "control characters"),
    ({"model": "tiny-c2i", "class_id": "one"}, "class_id"),
])
def test_invalid_requests_get_422_naming_the_problem(gw, payload, fragment) -> None:
    response = gw.client.post("/v1/generations", headers=gw.auth(gw.key("creator")), json=payload)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert fragment in error["message"]
    assert error["code"] in ("invalid_request", "unknown_model")


def test_a_nan_parameter_is_named_as_not_a_finite_number(gw) -> None:
    # Python's json module writes float("nan") as NaN; without the finite check the bound would be blamed
    response = gw.client.post("/v1/generations", headers={**gw.auth(gw.key("creator")),
                              "Content-Type": "application/json"},
                              content=b'{"model": "tiny-c2i", "class_id": 1, "params": {"temperature": NaN}}')
    assert response.status_code == 422
    assert error_of(response)["message"] == "params.temperature: Input should be a finite number"


def test_malformed_json_is_a_422_not_a_500(gw) -> None:
    response = gw.client.post("/v1/generations", content=b'{"model": "tiny-c2i", "class_id": ',
                              headers={**gw.auth(gw.key("creator")), "Content-Type": "application/json"})
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_request"
    assert error_of(response)["message"] == "the body is not valid JSON (at character 34: Expecting value)"


def test_unknown_paths_and_methods_use_the_error_body(gw) -> None:
    assert error_of(gw.client.get("/v1/nothing-here"))["code"] == "not_found"
    assert error_of(gw.client.delete("/v1/models"))["code"] == "method_not_allowed"


@pytest.mark.parametrize("path", ["/v1/audit/events", "/v1/audit/export"])
@pytest.mark.parametrize("since,fragment", [
    ("2026-01-01", "give a timezone, e.g. 2026-01-01T00:00:00Z"),
    ("2026-01-01T00:00:00", "give a timezone, e.g. 2026-01-01T00:00:00Z"),
    ("9999-12-31T23:59:59-14:00", "out of range once converted to UTC"),
    ("0001-01-01T00:00:00+01:00", "out of range once converted to UTC"),
])
def test_audit_time_bounds_without_a_timezone_or_out_of_range_are_a_422_naming_the_parameter(
        gw, path, since, fragment) -> None:
    response = gw.client.get(path, params={"since": since}, headers=gw.auth(gw.key("auditor")))
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "invalid_request"
    assert error["message"] == f"query.since: {fragment}"


def test_audit_time_bounds_with_any_timezone_are_compared_in_utc(gw) -> None:
    auditor = gw.auth(gw.key("auditor"))
    everything = gw.client.get("/v1/audit/events", headers=auditor).json()["count"]
    assert everything > 0
    since_start = gw.client.get("/v1/audit/events", params={"since": "2000-01-01T02:00:00+02:00"}, headers=auditor)
    assert since_start.status_code == 200 and since_start.json()["count"] == everything
    nothing_yet = gw.client.get("/v1/audit/export", params={"since": "9999-12-31T23:59:59+00:00"}, headers=auditor)
    assert nothing_yet.status_code == 200
    types = [json.loads(line)["type"] for line in nothing_yet.text.splitlines()]
    assert types[0] == "header" and "event" not in types and "error" not in types


def test_listing_generations_by_an_unknown_status_is_a_422_naming_the_statuses(gw) -> None:
    response = gw.client.get("/v1/generations", params={"status": "bogus"}, headers=gw.auth(gw.key("creator")))
    assert response.status_code == 422
    message = error_of(response)["message"]
    assert message.startswith("query.status:")
    assert all(status in message for status in ("queued", "review", "running", "completed", "blocked", "failed"))


def test_listing_generations_by_a_status_returns_only_those(gw) -> None:
    key = gw.key("creator")
    job = gw.client.post("/v1/generations", headers=gw.auth(key), json={"class_id": 1}).json()
    gw.wait(job["id"], key)
    completed = gw.client.get("/v1/generations", params={"status": "completed"}, headers=gw.auth(key)).json()
    assert [j["id"] for j in completed["data"]] == [job["id"]]
    assert gw.client.get("/v1/generations", params={"status": "review"}, headers=gw.auth(key)).json()["count"] == 0


def test_paging_generations_with_before_sees_each_job_once_while_new_ones_arrive(gw) -> None:
    key = gw.key("creator")

    def submit() -> str:
        job = gw.client.post("/v1/generations", headers=gw.auth(key), json={"class_id": 1}).json()
        gw.wait(job["id"], key)
        return str(job["id"])

    first = [submit() for _ in range(5)]
    seen, before = [], None
    while True:
        page = gw.client.get("/v1/generations", headers=gw.auth(key),
                             params={"limit": 2, **({"before": before} if before else {})}).json()
        seen += [job["id"] for job in page["data"]]
        submit()  # arrives between pages: offsets would shift the next page onto jobs already read
        before = page["next_before"]
        if before is None:
            break
    assert seen == list(reversed(first))


def test_paging_from_a_job_the_caller_cannot_see_is_a_422(gw) -> None:
    other = gw.key("creator", team="legal")
    job = gw.client.post("/v1/generations", headers=gw.auth(other), json={"class_id": 1}).json()
    for before in (job["id"], "no-such-job"):
        response = gw.client.get("/v1/generations", headers=gw.auth(gw.key("creator")), params={"before": before})
        assert response.status_code == 422 and error_of(response)["message"].startswith("before: no generation")


def test_junk_upload_to_provenance_verify_is_a_clear_4xx(gw) -> None:
    response = gw.client.post("/v1/provenance/verify", content=b"this is not an image",
                              headers={**gw.auth(gw.key("auditor")), "Content-Type": "image/png"})
    assert response.status_code == 422
    assert error_of(response)["code"] == "invalid_request"


@pytest.mark.parametrize("junk,mime", [(b"\x89PNG\r\n\x1a\n", "image/png"),
                                       (b"\x89PNG\r\n\x1a\n" + b"junk" * 50, "image/png"),
                                       (b"\xff\xd8\xff" + b"junk" * 50, "image/jpeg")])
def test_junk_behind_png_or_jpeg_magic_bytes_is_a_422_not_a_report(gw, junk: bytes, mime: str) -> None:
    response = gw.client.post("/v1/provenance/verify", content=junk,
                              headers={**gw.auth(gw.key("auditor")), "Content-Type": mime})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"not a readable {mime} file")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_unsigned_images_are_reported_as_having_no_manifest(gw, fmt: str) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format=fmt)
    response = gw.client.post("/v1/provenance/verify", content=buf.getvalue(),
                              headers={**gw.auth(gw.key("auditor")), "Content-Type": f"image/{fmt.lower()}"})
    assert response.status_code == 200
    report = response.json()
    assert report["has_manifest"] is False and report["ok"] is False and "no C2PA manifest" in report["summary"]


@pytest.mark.parametrize("path,limit,mime", [
    ("/v1/provenance/verify", "gateway.routes.provenance.MAX_UPLOAD", "image/png"),
    ("/v1/policies/dry-run", "gateway.routes.policies.MAX_POLICY_BYTES", "application/yaml"),
    ("/v1/policies", "gateway.routes.policies.MAX_POLICY_BYTES", "application/yaml"),
])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_raw_body_over_its_limit_is_a_413(gw, monkeypatch, path, limit, mime, chunked) -> None:
    monkeypatch.setattr(limit, 1000)
    body = b"\x89PNG\r\n\x1a\n" + b"x" * 1000
    content = iter([body[:500], body[500:]]) if chunked else body  # an iterator goes without a Content-Length
    response = gw.client.post(path, content=content, headers={**gw.auth(gw.key("admin")), "Content-Type": mime})
    assert response.status_code == 413, response.text
    assert error_of(response)["code"] == "payload_too_large"
    assert "larger than 1000 bytes" in error_of(response)["message"]


def test_rate_limit_per_key_answers_429_with_retry_after(gateway_factory, tiny_models) -> None:
    gw = gateway_factory(models_dir=tiny_models, default_model="tiny-c2i", rate_limit_per_minute=2,
                         policy_file=LEXICAL_POLICY)
    key = gw.key("creator")
    statuses = [gw.client.post("/v1/moderations", headers=gw.auth(key), json={"prompt": "a red star"})
                for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert int(statuses[-1].headers["retry-after"]) >= 1
    assert error_of(statuses[-1])["code"] == "rate_limited"
    other = gw.key("creator")
    assert gw.client.post("/v1/moderations", headers=gw.auth(other), json={"prompt": "a red star"}).status_code == 200


def test_team_image_quota_answers_429(gateway_factory, tiny_models) -> None:
    gw = gateway_factory(models_dir=tiny_models, default_model="tiny-c2i", team_quota_per_day=3,
                         policy_file=LEXICAL_POLICY)
    key = gw.key("creator", team="small")
    first = gw.client.post("/v1/generations", headers=gw.auth(key), json={"class_id": 1, "params": {"num_images": 2}})
    second = gw.client.post("/v1/generations", headers=gw.auth(key), json={"class_id": 1, "params": {"num_images": 2}})
    assert first.status_code == 202 and second.status_code == 429
    assert "quota" in error_of(second)["message"]
    gw.wait(first.json()["id"], key)


def test_a_served_gateway_applies_the_team_rate_limit_and_the_key_quota(gateway_factory, tiny_models) -> None:
    gw = gateway_factory(models_dir=tiny_models, default_model="tiny-c2i", team_rate_limit_per_minute=2,
                         key_quota_per_day=1, policy_file=LEXICAL_POLICY)
    first, second = gw.key("creator", team="busy"), gw.key("creator", team="busy")
    moderate = [gw.client.post("/v1/moderations", headers=gw.auth(key), json={"prompt": "a red star"})
                for key in (first, second, second)]
    assert [r.status_code for r in moderate] == [200, 200, 429]  # two keys, one team: the team's limit
    assert "team" in error_of(moderate[-1])["message"] and int(moderate[-1].headers["retry-after"]) >= 1
    quiet = gw.key("creator", team="quiet")
    accepted = gw.client.post("/v1/generations", headers=gw.auth(quiet), json={"class_id": 1})
    refused = gw.client.post("/v1/generations", headers=gw.auth(quiet), json={"class_id": 2})
    assert accepted.status_code == 202 and refused.status_code == 429
    assert "quota" in error_of(refused)["message"]
    gw.wait(accepted.json()["id"], quiet)


def test_invalid_requests_use_none_of_the_team_image_quota(gateway_factory, tiny_models) -> None:
    gw = gateway_factory(models_dir=tiny_models, default_model="tiny-c2i", team_quota_per_day=2,
                         policy_file=LEXICAL_POLICY)
    key = gw.key("creator", team="small")
    for invalid in ({"class_id": 10, "params": {"num_images": 2}},  # out of range for the model
                    {"prompt": "a red star", "params": {"num_images": 2}},  # a prompt for a class model
                    {"class_id": 1, "params": {"num_images": 9}},  # over the per-request image limit
                    {"model": "no-such-model", "class_id": 1, "params": {"num_images": 2}}):
        response = gw.client.post("/v1/generations", headers=gw.auth(key), json=invalid)
        assert response.status_code == 422, response.text
    accepted = gw.client.post("/v1/generations", headers=gw.auth(key),
                              json={"class_id": 1, "params": {"num_images": 2}})
    assert accepted.status_code == 202, accepted.text
    gw.wait(accepted.json()["id"], key)


def test_a_refused_request_gives_its_images_back_to_the_quota(gateway_factory, tiny_models) -> None:
    gw = gateway_factory(models_dir=tiny_models, default_model="tiny-t2i", team_quota_per_day=1,
                         policy_file=LEXICAL_POLICY)
    key = gw.key("creator", team="small")
    blocked = gw.client.post("/v1/generations", headers=gw.auth(key), json={"prompt": "a forbidden red star"})
    assert blocked.status_code == 400, blocked.text
    accepted = gw.client.post("/v1/generations", headers=gw.auth(key), json={"prompt": "a red star"})
    assert accepted.status_code == 202, accepted.text  # the blocked request's image did not count
    refused = gw.client.post("/v1/generations", headers=gw.auth(key), json={"prompt": "a blue star"})
    assert refused.status_code == 429
    gw.wait(accepted.json()["id"], key)


def test_a_prompt_a_reviewer_rejects_gives_its_images_back_to_the_quota(gateway_factory, tiny_models) -> None:
    gw = gateway_factory(models_dir=tiny_models, default_model="tiny-t2i", team_quota_per_day=3,
                         policy_file=LEXICAL_POLICY)
    creator, reviewer = gw.key("creator", team="small"), gw.key("reviewer", team="review")
    parked = gw.client.post("/v1/generations", headers=gw.auth(creator),
                            json={"prompt": "a senator", "params": {"num_images": 3}})
    assert parked.status_code == 202 and parked.json()["status"] == "review", parked.text
    full = gw.client.post("/v1/generations", headers=gw.auth(creator), json={"prompt": "a red star"})
    assert full.status_code == 429  # the parked job's three images are charged while it waits
    decided = gw.client.post(f"/v1/review/{parked.json()['id']}", headers=gw.auth(reviewer),
                             json={"decision": "reject", "reason": "no real people"})
    assert decided.status_code == 200, decided.text
    accepted = gw.client.post("/v1/generations", headers=gw.auth(creator),
                              json={"prompt": "a red star", "params": {"num_images": 3}})
    assert accepted.status_code == 202, accepted.text  # nothing was generated for the rejected one
    gw.wait(accepted.json()["id"], creator)


def test_moderation_screens_and_audits_without_generating(gw) -> None:
    key = gw.key("creator")
    result = gw.client.post("/v1/moderations", headers=gw.auth(key), json={"prompt": "something forbidden"})
    assert result.status_code == 200
    body = result.json()
    assert body["decision"]["action"] == "block"
    events = gw.client.get("/v1/audit/events", params={"action": "moderation.screened"},
                           headers=gw.auth(gw.key("auditor"))).json()["data"]
    assert body["audit_event_id"] in [e["id"] for e in events]
    assert gw.client.get("/v1/generations", headers=gw.auth(key)).json()["count"] == 0


def test_readiness_reports_each_dependency(gw) -> None:
    ready = gw.client.get("/readyz")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert set(checks) == {"database", "broker", "workers", "signer", "policy"}
    assert checks["workers"]["detail"][0]["host"] == "in-process"
    assert gw.client.get("/healthz").json() == {"status": "ok"}
    assert "gateway_http_requests_total" in gw.client.get("/metrics").text


def test_metrics_show_decisions_stage_latencies_batches_and_utilisation_of_a_generation(gw) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = gw.client.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = samples()
    key = gw.key("creator", team="design")
    job = gw.client.post("/v1/generations", json={"model": "tiny-c2i", "class_id": 1, "params": {"seed": 1}},
                         headers=gw.auth(key)).json()
    done = gw.client.get(f"/v1/generations/{job['id']}", params={"wait": 30}, headers=gw.auth(key)).json()
    assert done["status"] == "completed"
    after = samples()

    def grew(name: str, **labels: str) -> float:
        at = (name, tuple(sorted(labels.items())))
        return after.get(at, 0.0) - before.get(at, 0.0)

    assert grew("gateway_decisions_total", stage="prompt", action="allow", team="design", model="tiny-c2i") == 1
    assert grew("worker_output_decisions_total", action="allow", model="tiny-c2i") == 1
    for stage in ("prompt_screening", "request_audit"):
        assert grew("gateway_stage_seconds_count", stage=stage) == 1
    for stage in ("queue", "sampling", "decode", "output_screening", "signing", "store", "audit"):
        assert grew("worker_stage_seconds_count", stage=stage) == 1, stage
    # the audit stages are timed until their commits are durable: at least what the row holds (in the transaction)
    assert grew("worker_stage_seconds_sum", stage="audit") >= done["timings"]["release_audit_s"]
    assert grew("gateway_stage_seconds_sum", stage="request_audit") >= done["timings"]["request_audit_s"]
    assert grew("worker_batch_size_count") == 1 and grew("worker_batch_size_sum") == 1
    assert grew("worker_busy_seconds_total") > 0
    assert ("gateway_jobs", (("status", "completed"),)) in after


def test_an_invalid_policy_is_a_422_listing_field_and_line(gateway_factory, tiny_models) -> None:
    gw = gateway_factory(models_dir=tiny_models, default_model="tiny-c2i", policy_file=LEXICAL_POLICY)
    bad = "id: p\nversion: '1'\ndescription: d\nprompt:\n  lexical:\n    - id: r\n      action: explode\n"
    response = gw.client.post("/v1/policies", content=bad.encode(),
                              headers={**gw.auth(gw.key("policy_admin")), "Content-Type": "application/yaml"})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_policy"
    problem = error["details"]["problems"][0]
    assert problem["field"].startswith("prompt.lexical.0") and problem["line"] >= 6


@pytest.mark.parametrize("path", ["/v1/policies", "/v1/policies/dry-run"])
@pytest.mark.parametrize("body", [
    b"id: p\nversion: '1'\x00\n",  # a control character YAML refuses before parsing
    b"id: p\nversion: 2020-02-30\n",  # a date that does not exist
    b"id: p\nversion: " + b"9" * 5001 + b"\n",  # an integer past Python's digit limit
    b"id: p\nversion: '1'\n? [a, b]\n: c\n",  # a list as a mapping key
    b"id: p\nversion: " + b"[" * 5000 + b"]" * 5000 + b"\n",  # nesting past Python's recursion limit
    b"id: p\nversion: '1'\nprompt:\n  lexical:\n    - {id: r, action: block, patterns: ['a{4294967296}']}\n",
    b"id: p\nversion: '1'\nl0: &l0 [x, x, x, x, x, x, x, x, x, x]\n"
    + b"".join(b"l%d: &l%d [%s]\n" % (i, i, b", ".join([b"*l%d" % (i - 1)] * 10)) for i in range(1, 10)),
], ids=["control-character", "impossible-date", "huge-integer", "list-as-key", "deep-nesting", "huge-repeat",
        "alias-bomb"])
def test_policy_yaml_that_cannot_be_built_is_a_422_not_a_500(gw, path: str, body: bytes) -> None:
    response = gw.client.post(path, content=body,
                              headers={**gw.auth(gw.key("policy_admin")), "Content-Type": "application/yaml"})
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "invalid_policy"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("mime", ["application/json", "text/plain", None])
def test_a_body_over_the_limit_is_a_413_naming_the_limit(gw, chunked, mime) -> None:
    body = json.dumps({"class_id": 1, "prompt": "x" * 2 * 1024 * 1024}).encode()  # 2 MiB, over the 1 MiB default
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    content = iter(chunks) if chunked else body  # an iterator goes without a Content-Length
    headers = {**gw.auth(gw.key("creator")), **({"Content-Type": mime} if mime else {})}
    response = gw.client.post("/v1/generations", content=content, headers=headers)
    assert response.status_code == 413, response.text
    assert error_of(response)["code"] == "payload_too_large"
    assert error_of(response)["message"] == "the request body is larger than 1048576 bytes"


def test_a_json_body_within_the_limit_is_accepted(gw) -> None:
    response = gw.client.post("/v1/generations", headers=gw.auth(gw.key("creator")),
                              json={"class_id": 1, "params": {"seed": 7}})
    assert response.status_code == 202, response.text
