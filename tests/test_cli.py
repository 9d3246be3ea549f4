"""The `llamagen-gateway` command: keys, migrate, dev-setup, a governed generation from the shell."""

from __future__ import annotations

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
