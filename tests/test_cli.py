"""The `llamagen-gateway` command: keys, migrate, dev-setup, a governed generation from the shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import LEXICAL_POLICY, REPO


@pytest.fixture
def env(tmp_path, tiny_models) -> dict[str, str]:
    return {**os.environ, "LLAMAGEN_GATEWAY_DATA_DIR": str(tmp_path / "var"),
            "LLAMAGEN_GATEWAY_MODELS_DIR": str(tiny_models), "LLAMAGEN_GATEWAY_POLICY_FILE": str(LEXICAL_POLICY),
            "LLAMAGEN_GATEWAY_DEFAULT_MODEL": "tiny-c2i", "LLAMAGEN_GATEWAY_LOG_JSON": "false"}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)


def test_keys_create_prints_the_key_on_its_last_line(env) -> None:
    assert run(env, "migrate").returncode == 0
    result = run(env, "keys", "create", "--role", "auditor", "--team", "legal")
    assert result.returncode == 0
    assert result.stdout.strip().splitlines()[-1].startswith("lgw_")


def test_keys_create_refuses_an_unknown_role_clearly(env) -> None:
    result = run(env, "keys", "create", "--role", "root", "--team", "legal")
    assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_a_prefork_worker_pool_with_one_metrics_port_is_refused_naming_the_setting(env) -> None:
    env = {**env, "LLAMAGEN_GATEWAY_BROKER_URL": "redis://127.0.0.1:6379/15",
           "LLAMAGEN_GATEWAY_WORKER_METRICS_PORT": "9109"}
    result = run(env, "worker", "--pool", "prefork", "--concurrency", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "LLAMAGEN_GATEWAY_WORKER_METRICS_PORT=9109" in result.stderr and "--pool solo" in result.stderr


def test_dev_setup_makes_the_development_ca_and_a_reusable_key(env) -> None:
    env = {**env, "LLAMAGEN_GATEWAY_ENV": "dev"}
    assert run(env, "migrate").returncode == 0
    first, second = run(env, "dev-setup"), run(env, "dev-setup")
    assert first.returncode == 0 and "DEV-ONLY" in first.stdout
    assert first.stdout.splitlines()[-1] == second.stdout.splitlines()[-1]


def test_generate_runs_the_governed_pipeline_and_writes_a_signed_png(env, tmp_path) -> None:
    out = tmp_path / "image.png"
    result = run(env, "generate", "--class-id", "3", "--seed", "5", "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed" in result.stdout
    verified = run(env, "provenance", "verify", str(out))
    assert verified.returncode == 0 and "content intact" in verified.stdout
    assert run(env, "audit", "verify").returncode == 0


def test_generate_of_a_blocked_prompt_exits_non_zero_with_the_policy_code(env, tmp_path) -> None:
    env = {**env, "LLAMAGEN_GATEWAY_DEFAULT_MODEL": "tiny-t2i"}
    result = run(env, "generate", "--prompt", "something forbidden", "-o", str(tmp_path / "x.png"))
    assert result.returncode == 1 and "content_policy_violation" in result.stderr


def test_a_bad_setting_names_the_variable_without_a_traceback(env) -> None:
    result = run({**env, "LLAMAGEN_GATEWAY_WORKER_BATCH_SIZE": "zero"}, "models", "list")
    assert result.returncode == 2
    assert "LLAMAGEN_GATEWAY_WORKER_BATCH_SIZE" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("junk", [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"garbage" * 100],
                         ids=["text", "png-magic-then-garbage"])
def test_provenance_verify_of_a_file_that_is_no_image_exits_2_as_unreadable(env, tmp_path, junk) -> None:
    path = tmp_path / "junk.png"
    path.write_bytes(junk)
    result = run(env, "provenance", "verify", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {path}: not a readable image/png file" in result.stderr and "Traceback" not in result.stderr


def test_provenance_verify_of_an_unsigned_image_exits_1(env, tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "unsigned.png"
    Image.new("RGB", (8, 8), "red").save(path)
    result = run(env, "provenance", "verify", str(path))
    assert result.returncode == 1 and "no C2PA manifest found" in result.stdout


def _plain_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_serve_with_an_invalid_policy_file_stops_with_the_file_field_and_line(env, tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: p\nversion: '1'\nprompt:\n  lexical:\n    - id: r\n      action: explode\n")
    error = _plain_error(run({**env, "LLAMAGEN_GATEWAY_POLICY_FILE": str(bad)}, "serve", "--port", "8791"))
    assert f"error: {bad}:6: prompt.lexical.0.action" in error


def test_serve_refuses_a_port_outside_the_tcp_range(env) -> None:
    assert "99999 is outside 1-65535" in _plain_error(run(env, "serve", "--port", "99999"))


def test_models_list_names_the_missing_models_directory_and_a_card_that_is_not_text(env, tmp_path) -> None:
    missing = tmp_path / "no-models"
    error = _plain_error(run({**env, "LLAMAGEN_GATEWAY_MODELS_DIR": str(missing)}, "models", "list"))
    assert f"models directory {missing} does not exist" in error
    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.yaml").write_bytes(b"name: \xff\xfe\n")
    error = _plain_error(run({**env, "LLAMAGEN_GATEWAY_MODELS_DIR": str(models)}, "models", "list"))
    assert "broken.yaml: model card is not UTF-8" in error


@pytest.mark.parametrize("target", ["a-directory", "no-such-folder/image.png"])
def test_generate_refuses_an_output_it_cannot_write_before_generating(env, tmp_path, target) -> None:
    (tmp_path / "a-directory").mkdir()
    out = tmp_path / target
    error = _plain_error(run(env, "generate", "--class-id", "3", "-o", str(out)))
    assert f"error: -o {out}: " in error
    assert not (tmp_path / "var" / "gateway.db").exists()  # nothing was started, so nothing was audited


def test_provenance_verify_names_trust_anchors_that_are_not_pem(env, tmp_path) -> None:
    from PIL import Image

    image, anchors = tmp_path / "image.png", tmp_path / "anchors.pem"
    Image.new("RGB", (8, 8)).save(image)
    anchors.write_bytes(bytes(range(256)))
    error = _plain_error(run(env, "provenance", "verify", str(image), "--trust-anchors", str(anchors)))
    assert error.startswith(f"error: {anchors}: the trust anchors are not PEM certificates")


def test_policy_replay_reads_what_audit_export_writes(env, tmp_path) -> None:
    assert run(env, "generate", "--class-id", "3", "-o", str(tmp_path / "image.png")).returncode == 0
    export = tmp_path / "export.jsonl"
    assert run(env, "audit", "export", "-o", str(export)).returncode == 0
    result = run(env, "policy", "replay", str(LEXICAL_POLICY), "--history", str(export), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total"] >= 1 and report["changed"] == 0  # the policy that decided them, replayed unchanged
