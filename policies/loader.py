"""Read and validate policy YAML; compute its revision. Errors name the file, the dotted field and the line."""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from policies.schema import FieldPath, Policy, check_policy

M = TypeVar("M", bound=BaseModel)


class PolicyError(ValueError):
    """A policy file that must not become active: unreadable, malformed or inconsistent."""

    def __init__(self, source_name: str, problems: Sequence[tuple[str, int | None, str]]) -> None:
        self.source_name = source_name
        self.problems = list(problems)
        lines = [_format_problem(source_name, field, line, message) for field, line, message in self.problems]
        super().__init__("\n".join(lines))


def _format_problem(source_name: str, field: str, line: int | None, message: str) -> str:
    where = f"{source_name}:{line}" if line is not None else source_name
    return f"{where}: {field or '<document>'}: {message}"


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy with its revision (content hash) and the exact source it came from."""

    policy: Policy
    revision: str
    source: str
    path: Path | None


def load_policy_file(path: str | Path) -> LoadedPolicy:
    """Load and validate one policy file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(path), [("", None, f"cannot read policy file: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(str(path), [("", None, f"policy file is not UTF-8: {exc}")]) from exc
    loaded = load_policy_text(text, name=str(path))
    return LoadedPolicy(loaded.policy, loaded.revision, loaded.source, path)


def load_policy_text(text: str, name: str = "<string>") -> LoadedPolicy:
    """Validate policy YAML given as text; `name` is used in error messages."""
    node, data = parse_yaml(text, name)
    policy = validate_document(Policy, node, data, name)
    issues = check_policy(policy)
    if issues:
        raise PolicyError(name, [(_dotted(i.path), line_of(node, i.path), i.message) for i in issues])
    return LoadedPolicy(policy=policy, revision=compute_revision(data), source=text, path=None)


def validate_document(model: type[M], node: yaml.Node | None, data: Any, name: str) -> M:
    """Validate parsed YAML against a pydantic model; errors carry the dotted field path and line."""
    if not isinstance(data, dict):
        raise PolicyError(name, [("", _line(node), f"the document must be a YAML mapping, not {type(data).__name__}")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = clean_loc(error["loc"])
            problems.append((_dotted(loc), line_of(node, loc), error_message(error)))
        raise PolicyError(name, problems) from None


def compute_revision(data: Any) -> str:
    """`sha256:` + hex of the canonical JSON of the parsed document (comments and layout do not count)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


MAX_DEPTH = 64  # a policy nests a few levels; anything deeper is a mistake or an attack on the parser


def parse_yaml(text: str, name: str) -> tuple[yaml.Node | None, Any]:
    """Parse YAML keeping the node tree (for line numbers); duplicate keys, non-scalar keys and absurd nesting
    are errors, and so is any value YAML cannot build (an impossible date, an integer past Python's limit)."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # rejects control characters here, before parsing starts
        node = loader.get_single_node()
        if node is None:
            raise PolicyError(name, [("", None, "the policy file is empty")])
        _check_shape(node, name)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise PolicyError(name, [("", line, f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError(name, [("", None, f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise PolicyError(name, [("", None, f"the document nests deeper than {MAX_DEPTH} levels")]) from None
    except PolicyError:  # a ValueError too: raised above, passed on unchanged
        raise
    except (ValueError, OverflowError) as exc:  # a value YAML cannot build: 2020-02-30, 5001 digits
        raise PolicyError(name, [("", None, f"invalid value: {exc}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return node, data


def _check_shape(root: yaml.Node, name: str) -> None:
    """Walk the node tree without recursion: nesting depth, no aliased collections, plain scalar keys, duplicate
    keys."""
    problems: list[tuple[str, int | None, str]] = []
    queue: deque[tuple[yaml.Node, FieldPath]] = deque([(root, ())])  # breadth first: the first alias is named
    visited: set[int] = set()
    while queue:
        node, path = queue.popleft()
        if isinstance(node, yaml.CollectionNode):
            # An alias (*name) is the node of its anchor again. Ten lines of nested aliases expand to
            # billions of values in every later step (validation, the revision hash), so a policy spells its
            # lists and mappings out; repeated scalars cost nothing and stay allowed.
            if id(node) in visited:
                raise PolicyError(name, [(_dotted(path), _line(node), "YAML aliases of lists or mappings are not "
                                                                      "allowed in policies: write the value out")])
            visited.add(id(node))
        if len(path) > MAX_DEPTH:
            raise PolicyError(name, [(_dotted(path[:3]) + ".…", _line(node),
                                      f"the document nests deeper than {MAX_DEPTH} levels")])
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    problems.append((_dotted(path), _line(key_node), "mapping keys must be plain names, "
                                                                     "not lists or mappings"))
                    continue
                key = key_node.value
                if key in seen:
                    problems.append((_dotted(path), _line(key_node),
                                     f"duplicate key {key!r} (YAML would silently keep the last one)"))
                seen.add(key)
                queue.append((value_node, path + (key,)))
        elif isinstance(node, yaml.SequenceNode):
            queue.extend((item, path + (i,)) for i, item in enumerate(node.value))
    if problems:
        raise PolicyError(name, sorted(problems, key=lambda p: p[1] or 0))


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def line_of(root: yaml.Node | None, path: Sequence[str | int]) -> int | None:
    """Line of the deepest node that exists along `path` (the key's line for mapping entries)."""
    node = root
    line = _line(root)
    for part in path:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    line, node = key_node.start_mark.line + 1, value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = _line(node)
        else:
            return line
    return line


def clean_loc(loc: Sequence[str | int]) -> FieldPath:
    # pydantic adds union-member and validator tags (e.g. 'list[str]', 'function-after[...]') that are
    # not keys of the document.
    return tuple(part for part in loc if not (isinstance(part, str) and ("[" in part or part.endswith("]"))))


def error_message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field (not part of the policy schema; check the spelling)"
    if kind == "missing":
        return "required field is missing"
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if kind not in ("value_error",) and "input" in error and not isinstance(error["input"], dict | list):
        message += f" (got {error['input']!r})"
    return message


def _dotted(path: Sequence[str | int]) -> str:
    return ".".join(str(part) for part in path)
