"""gateway/commands/policy.py: exit codes and messages that name file, field and line (no tracebacks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gateway.commands.policy import register
from policies.decisions import Context, decide
from policies.runtime import Screening

from .conftest import BASE_POLICY, RULES, policy, prompt_results


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="llamagen-gateway")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_validate_prints_the_revision_of_a_valid_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["policy", "validate", str(RULES / "default.yaml")], capsys)
    assert code == 0 and "revision sha256:" in out


def test_validate_exits_non_zero_naming_file_field_and_line(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "bad.yaml", 'id: p\nversion: "1"\naudit:\n  prompt_storage: shredded\n')
    code, _, err = run(["policy", "validate", str(path)], capsys)
    assert code == 1
    assert f"{path}:4: audit.prompt_storage: Input should be 'full', 'hashed' or 'redacted'" in err
    assert "Traceback" not in err


def test_test_runs_the_cases_beside_the_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "p.yaml", BASE_POLICY)
    write(tmp_path, "p.cases.yaml", """
cases:
  - id: zombie_is_flagged
    scores: {lexical: {horror: 1.0}}
    expect: {action: flag, reasons: [horror]}
  - id: wrong_expectation_fails
    scores: {lexical: {nudity: 1.0}}
    expect: {action: allow}
""")
    code, out, _ = run(["policy", "test", str(path)], capsys)
    assert code == 1
    assert "PASS zombie_is_flagged" in out
    assert "FAIL wrong_expectation_fails: action 'block', expected 'allow'" in out
    assert "1 passed, 1 failed" in out


def test_test_without_a_cases_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["policy", "test", str(write(tmp_path, "p.yaml", BASE_POLICY))], capsys)
    assert code == 2 and "p.cases.yaml: no cases file" in err


def test_diff_lists_changed_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, "a.yaml", BASE_POLICY)
    b = write(tmp_path, "b.yaml", BASE_POLICY.replace("words: [zombie]", "words: [zombie, ghoul]"))
    code, out, _ = run(["policy", "diff", str(a), str(b)], capsys)
    assert code == 0 and "+      words: [zombie, ghoul]" in out and "changed: horror" in out


def test_replay_reports_changes_from_an_exported_history(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    ctx = Context(model="demo")
    results = prompt_results(lexical={"horror": 1.0})
    screening = Screening(decide(policy(), results, ctx, "prompt"), tuple(results))
    history = write(tmp_path, "history.jsonl",
                    json.dumps({**screening.to_dict(), "id": "job-1", "context": ctx.to_dict()}) + "\n")
    candidate = write(tmp_path, "c.yaml", BASE_POLICY.replace("action: flag\n      words: [zombie]",
                                                              "action: block\n      words: [zombie]"))
    code, out, _ = run(["policy", "replay", str(candidate), "--history", str(history), "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["changed"] == 1 and report["by_rule"] == {"horror": 1}
    assert report["transitions"] == {"flag -> block": 1}


def test_replay_names_the_bad_history_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    history = write(tmp_path, "history.jsonl", "{}\nnot json\n")
    code, _, err = run(["policy", "replay", str(RULES / "default.yaml"), "--history", str(history)], capsys)
    assert code == 2 and f"{history}:1:" in err


@pytest.mark.parametrize("line,fragment", [
    ('{"decision": "allow"}', "no decision"),
    ('{"decision": {"action": "allow", "reasons": [{"action": "block"}]}}', "malformed (KeyError"),
    ('{"decision": {"action": "allow", "reasons": 5}}', "malformed (TypeError"),
    ('{"decision": {"action": "allow", "stage": "prompt"}, "results": ["x"]}', "malformed ("),
    ('{"decision": {"action": "allow", "stage": "prompt"}, "context": "design"}', "malformed (AttributeError"),
], ids=["decision-not-object", "reason-without-rule", "reasons-not-list", "result-not-object", "context-not-object"])
def test_replay_names_the_line_of_a_record_of_the_wrong_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              line: str, fragment: str) -> None:
    history = write(tmp_path, "history.jsonl", line + "\n")
    code, _, err = run(["policy", "replay", str(RULES / "default.yaml"), "--history", str(history)], capsys)
    assert code == 2 and err.startswith(f"{history}:1: history record line 1: {fragment}"), err


def test_replay_names_the_line_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    history = tmp_path / "history.jsonl"
    history.write_bytes(b"\n\xff\xfe{}\n")
    code, _, err = run(["policy", "replay", str(RULES / "default.yaml"), "--history", str(history)], capsys)
    assert code == 2 and err.startswith(f"{history}:2: not UTF-8 text")


def test_a_cases_file_that_is_not_utf8_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = write(tmp_path, "p.yaml", BASE_POLICY)
    (tmp_path / "p.cases.yaml").write_bytes(b"cases:\n  - id: \xff\n")
    code, _, err = run(["policy", "test", str(target)], capsys)
    assert code == 1 and f"{tmp_path / 'p.cases.yaml'}: <document>: cases file is not UTF-8" in err


def test_a_case_scoring_a_classifier_the_policy_lacks_names_the_cases_file_and_case(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "p.yaml", BASE_POLICY)
    cases = write(tmp_path, "p.cases.yaml", "cases:\n  - id: typo\n    scores: {lexicl: {horror: 1.0}}\n"
                                            "    expect: {action: flag}\n")
    code, _, err = run(["policy", "test", str(path)], capsys)
    assert code == 1 and f"{cases}: cases.0.scores: case 'typo': no classifier named lexicl" in err
