"""`llamagen-gateway policy ...`: validate, test, diff and replay policy files from the shell.

Each handler returns an exit code: 0 success, 1 a policy problem (invalid file, failing case), 2 bad usage
or unreadable input. Messages name the file, the field and the line; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from policies.cases import cases_path_for, run_cases_file, summarise
from policies.diff import diff_policies
from policies.loader import LoadedPolicy, PolicyError, load_policy_file
from policies.replay import REPLAYABLE_ACTIONS, HistoryItem, ReplayError, history_of_event, replay

EXIT_OK, EXIT_POLICY, EXIT_USAGE = 0, 1, 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `policy` command group to the main CLI."""
    policy = subparsers.add_parser("policy", help="validate, test, diff and replay policy files")
    commands = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    validate = commands.add_parser("validate", help="check a policy file; print its revision")
    validate.add_argument("file", type=Path, help="policy YAML")
    validate.set_defaults(func=cmd_validate)

    test = commands.add_parser("test", help="run the cases file beside a policy (FILE.cases.yaml)")
    test.add_argument("file", type=Path, help="policy YAML (or its .cases.yaml)")
    test.add_argument("--cases", type=Path, default=None, help="cases file (default: beside the policy)")
    test.add_argument("--models-dir", type=Path, default=Path("models"), help="models directory")
    test.add_argument("--device", default="cpu", help="torch device for the classifiers")
    test.set_defaults(func=cmd_test)

    diff = commands.add_parser("diff", help="diff two policy files: text and changed rule ids")
    diff.add_argument("a", type=Path, help="old policy YAML")
    diff.add_argument("b", type=Path, help="new policy YAML")
    diff.set_defaults(func=cmd_diff)

    replay_cmd = commands.add_parser("replay", help="dry-run a candidate policy over exported history")
    replay_cmd.add_argument("file", type=Path, help="candidate policy YAML")
    replay_cmd.add_argument("--history", type=Path, required=True,
                            help="JSONL: the output of `audit export` (its screening events), or one past screening "
                                 "per line (Screening.to_dict() + id + context)")
    replay_cmd.add_argument("--json", action="store_true", help="print the full report as JSON")
    replay_cmd.set_defaults(func=cmd_replay)


def _load(path: Path) -> LoadedPolicy | None:
    try:
        return load_policy_file(path)
    except PolicyError as exc:
        print(f"invalid policy:\n{exc}", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = _load(args.file)
    if loaded is None:
        return EXIT_POLICY
    policy = loaded.policy
    print(f"{args.file}: ok: policy {policy.id!r} version {policy.version} revision {loaded.revision}")
    return EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    path: Path = args.file
    if path.name.endswith(".cases.yaml"):
        cases_path, policy_path = path, None
    else:
        cases_path, policy_path = args.cases or cases_path_for(path), path
    if not cases_path.is_file():
        print(f"{cases_path}: no cases file (expected beside the policy as NAME.cases.yaml)", file=sys.stderr)
        return EXIT_USAGE
    try:
        loaded, results = run_cases_file(cases_path, models_dir=args.models_dir, device=args.device,
                                         policy_path=policy_path)
    except PolicyError as exc:
        print(f"invalid policy or cases file:\n{exc}", file=sys.stderr)
        return EXIT_POLICY
    for result in results:
        mark = "PASS" if result.passed else "FAIL"
        print(f"{mark} {result.case_id}" + ("" if result.passed else f": {result.message}"))
    summary = summarise(results)
    print(f"{summary['passed']} passed, {summary['failed']} failed ({cases_path}, policy {loaded.revision})")
    return EXIT_OK if not summary["failed"] else EXIT_POLICY


def cmd_diff(args: argparse.Namespace) -> int:
    old, new = _load(args.a), _load(args.b)
    if old is None or new is None:
        return EXIT_POLICY
    diff = diff_policies(old, new, str(args.a), str(args.b))
    if diff.identical:
        print(f"same revision {old.revision}")
        return EXIT_OK
    sys.stdout.write(diff.unified)
    for label, ids in (("added", diff.added_rules), ("removed", diff.removed_rules),
                       ("changed", diff.changed_rules), ("teams changed", diff.changed_teams)):
        if ids:
            print(f"{label}: {', '.join(ids)}")
    return EXIT_OK


def _history(path: Path) -> Iterator[HistoryItem]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ReplayError(f"{path}:{number}: not UTF-8 text ({exc.reason})") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReplayError(f"{path}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ReplayError(f"{path}:{number}: expected a JSON object")
            try:
                if "type" in record:  # a line of `audit export`: its screening events; header and checkpoints aside
                    body = record.get("body")
                    if record["type"] == "event" and isinstance(body, dict) and isinstance(body.get("payload"), dict) \
                            and body.get("action") in REPLAYABLE_ACTIONS:
                        yield from history_of_event(str(body.get("id")), body.get("team"), body["payload"])
                    continue
                yield HistoryItem.from_dict(record, default_id=f"line {number}")
            except ReplayError as exc:
                raise ReplayError(f"{path}:{number}: {exc}") from exc


def cmd_replay(args: argparse.Namespace) -> int:
    candidate = _load(args.file)
    if candidate is None:
        return EXIT_POLICY
    try:
        report = replay(candidate, _history(args.history))
    except OSError as exc:
        print(f"{args.history}: cannot read history: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except ReplayError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return EXIT_OK
