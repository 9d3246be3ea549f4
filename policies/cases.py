"""Policy test cases (like OPA's tests): a `*.cases.yaml` beside each policy, inputs or scores -> expectations.

A case either gives a `prompt` (the real classifiers run, so the models must be present) or scripted
`scores` per classifier (labels not given score 0.0, contrast labels such as `<category>.contrast` too),
optionally with classifier `errors`. The expected
`reasons` are the exact set of enforced rule ids; `shadow` likewise for shadow rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from policies.classifiers.base import ClassifierResult
from policies.decisions import Context, Decision, decide, effective_rules
from policies.loader import (
    LoadedPolicy,
    PolicyError,
    line_of,
    load_policy_file,
    parse_yaml,
    validate_document,
)
from policies.runtime import PolicyRuntime, text_classifier_names
from policies.schema import Action, CaptionSource


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class LineageStage(_Strict):
    name: str | None = Field(None, description="Stage name, e.g. 'stage 1'.")
    dataset: str | None = Field(None, description="Dataset name.")
    caption_source: CaptionSource | None = Field(None, description="Where the captions came from.")
    advisories: list[str] = Field(default_factory=list, description="Dataset advisories.")


class CaseContext(_Strict):
    team: str | None = Field(None, description="Team of the caller.")
    model: str | None = Field(None, description="Requested model.")
    use: str | None = Field(None, description="Declared use.")
    lineage: list[LineageStage] = Field(default_factory=list, description="The model's training lineage.")

    def to_context(self) -> Context:
        return Context(team=self.team, model=self.model, use=self.use,
                       lineage=tuple(s.model_dump(exclude_none=True) for s in self.lineage))


class Expectation(_Strict):
    action: Action = Field(description="Expected action.")
    reasons: list[str] | None = Field(None, description="Exact set of enforced rule ids (omit: not checked).")
    shadow: list[str] | None = Field(None, description="Exact set of shadow rule ids (omit: not checked).")


class Case(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="The case as a sentence in snake_case.")
    stage: Literal["prompt", "output", "model"] = Field("prompt", description="Which decision is tested.")
    prompt: str | None = Field(None, description="A prompt to screen with the real classifiers.")
    scores: dict[str, dict[str, float]] | None = Field(None, description="Scripted scores per classifier.")
    errors: dict[str, str] = Field(default_factory=dict, description="Classifier name -> simulated error.")
    context: CaseContext = Field(default_factory=CaseContext, description="Who asks, with which model.")
    expect: Expectation


class CasesFile(_Strict):
    policy: str | None = Field(None, description="Policy file, relative to this file (default: the sibling).")
    cases: list[Case] = Field(min_length=1, description="The cases.")


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    passed: bool
    decision: Decision
    message: str


def policy_path_for(cases_path: Path, declared: str | None = None) -> Path:
    """`rules/default.cases.yaml` tests `rules/default.yaml` unless the file names another policy."""
    if declared is not None:
        return cases_path.parent / declared
    return cases_path.with_name(cases_path.name.replace(".cases.yaml", ".yaml"))


def cases_path_for(policy_path: Path) -> Path:
    """The cases file beside a policy: `x.yaml` -> `x.cases.yaml`."""
    return policy_path.with_name(policy_path.stem + ".cases.yaml")


def load_cases(path: Path) -> CasesFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(path), [("", None, f"cannot read cases file: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(str(path), [("", None, f"cases file is not UTF-8: {exc}")]) from exc
    node, data = parse_yaml(text, str(path))
    cases = validate_document(CasesFile, node, data, str(path))
    problems: list[tuple[str, int | None, str]] = []
    seen: set[str] = set()
    for i, case in enumerate(cases.cases):
        where = f"cases.{i}"
        if case.id in seen:
            problems.append((where + ".id", line_of(node, ("cases", i, "id")), f"duplicate case id {case.id!r}"))
        seen.add(case.id)
        scripted = case.scores is not None or bool(case.errors)
        if case.prompt is not None and (scripted or case.stage != "prompt"):
            problems.append((where + ".prompt", line_of(node, ("cases", i, "prompt")),
                             "a `prompt` case runs the prompt classifiers: give no scores or errors, stage prompt"))
        if case.prompt is None and not scripted and case.stage != "model":
            problems.append((where, line_of(node, ("cases", i)), "give a `prompt` or scripted `scores`/`errors`"))
    if problems:
        raise PolicyError(str(path), problems)
    return cases


def scripted_results(loaded: LoadedPolicy, case: Case, ctx: Context) -> list[ClassifierResult]:
    """Results as the classifiers of `case.stage` would report them, from the case's scripted scores."""
    if case.stage == "model":
        return []
    names = text_classifier_names(loaded.policy) if case.stage == "prompt" else ["image_concepts"]
    given = case.scores or {}
    unknown = set(given) - set(names)
    if unknown:
        raise PolicyError(case.id, [("scores", None, f"no classifier named {', '.join(sorted(unknown))} at stage "
                                                     f"{case.stage!r}; known: {', '.join(names)}")])
    labels: dict[str, dict[str, float]] = {name: {} for name in names}
    for rule in effective_rules(loaded.policy, ctx.team, case.stage):
        labels[rule.classifier][rule.label] = 0.0
        if rule.contrast_label is not None:
            labels[rule.classifier][rule.contrast_label] = 0.0
    results = []
    for name in names:
        error = case.errors.get(name)
        scores = {} if error is not None else {**labels[name], **given.get(name, {})}
        results.append(ClassifierResult(name, "scripted", scores, 0.0, error))
    return results


def _check(case: Case, decision: Decision) -> CaseResult:
    problems = []
    if decision.action != case.expect.action:
        problems.append(f"action {decision.action!r}, expected {case.expect.action!r}")
    if case.expect.reasons is not None and sorted(set(decision.rule_ids)) != sorted(set(case.expect.reasons)):
        problems.append(f"reasons {sorted(set(decision.rule_ids))}, expected {sorted(set(case.expect.reasons))}")
    shadow = sorted({r.rule_id for r in decision.shadow})
    if case.expect.shadow is not None and shadow != sorted(set(case.expect.shadow)):
        problems.append(f"shadow {shadow}, expected {sorted(set(case.expect.shadow))}")
    return CaseResult(case.id, not problems, decision, "; ".join(problems) or "ok")


def run_case(loaded: LoadedPolicy, case: Case, runtime: Callable[[], PolicyRuntime]) -> CaseResult:
    """Decide one case and compare with its expectation."""
    ctx = case.context.to_context()
    if case.prompt is not None:
        decision = runtime().screen_prompt(case.prompt, ctx).decision
    else:
        decision = decide(loaded, scripted_results(loaded, case, ctx), ctx, case.stage)
    return _check(case, decision)


def run_cases_file(cases_path: Path, *, models_dir: Path, device: str = "cpu",
                   policy_path: Path | None = None) -> tuple[LoadedPolicy, list[CaseResult]]:
    """Run every case of a cases file against its policy; the runtime is built only if a case needs it."""
    cases = load_cases(cases_path)
    loaded = load_policy_file(policy_path or policy_path_for(cases_path, cases.policy))
    built: list[PolicyRuntime] = []

    def runtime() -> PolicyRuntime:
        if not built:
            built.append(PolicyRuntime(loaded, models_dir, device))
        return built[0]

    results = []
    for i, case in enumerate(cases.cases):
        try:
            results.append(run_case(loaded, case, runtime))
        except PolicyError as exc:  # a case the policy cannot run (a classifier it does not have): name the file
            raise PolicyError(str(cases_path), [(f"cases.{i}.{field}", line, f"case {case.id!r}: {message}")
                                                for field, line, message in exc.problems]) from None
    return loaded, results


def summarise(results: Sequence[CaseResult]) -> dict[str, Any]:
    failed = [r for r in results if not r.passed]
    return {"passed": len(results) - len(failed), "failed": len(failed),
            "failures": {r.case_id: r.message for r in failed}}
