"""Load a policy from YAML, reporting each error with its YAML path and line number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from controlplane.errors import FieldError, PolicyError
from controlplane.policy import Policy, RemoteRules, check_references, check_remote_engines

LinePath = tuple[str | int, ...]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (YAML silently keeps the last)."""


def _mapping_lines(node: yaml.Node, path: LinePath, lines: dict[LinePath, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise PolicyError(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r}",
                    details=[FieldError(_dotted(path + (key,)), "duplicate key")],
                )
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _mapping_lines(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _mapping_lines(item, path + (i,), lines)


def _dotted(path: LinePath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _line_for(path: LinePath, lines: dict[LinePath, int]) -> int | None:
    while True:
        if path in lines:
            return lines[path]
        if not path:
            return None
        path = path[:-1]


def _parse_path(dotted: str) -> LinePath:
    parts: list[str | int] = []
    for chunk in dotted.replace("]", "").split("."):
        head, *indexes = chunk.split("[")
        if head:
            parts.append(head)
        parts.extend(int(i) for i in indexes)
    return tuple(parts)


def parse_policy(text: str, *, source: str = "<policy>",
                 remote: RemoteRules | None = None) -> Policy:
    """Parse and validate policy YAML; raise PolicyError listing every problem with its line.

    With ``remote`` (the operator's rules, from this process's settings), remote engines
    are checked against them too; ``put_in_force`` checks them in any case.
    """
    try:
        root = yaml.compose(text, Loader=_UniqueKeyLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "unknown line"
        raise PolicyError(f"{source}: not valid YAML ({where}): {exc}") from exc
    if not isinstance(data, dict) or root is None:
        raise PolicyError(f"{source}: a policy is a YAML mapping at the top level")
    lines: dict[LinePath, int] = {}
    _mapping_lines(root, (), lines)

    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        details = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            details.append(_with_line(FieldError(_dotted(loc), message, err.get("input")
                                                 if err["type"] != "missing" else None),
                                      lines))
        raise _policy_error(source, details) from None

    found = check_references(policy)
    if remote is not None:
        found += check_remote_engines(policy, remote)
    refs = [_with_line(e, lines) for e in found]
    if refs:
        raise _policy_error(source, refs)
    return policy


def _with_line(error: FieldError, lines: dict[LinePath, int]) -> FieldError:
    line = _line_for(_parse_path(error.field), lines)
    where = f"line {line}: " if line else ""
    value = error.value if isinstance(error.value, str | int | float | bool) else None
    return FieldError(error.field, f"{where}{error.message}", value)


def _policy_error(source: str, details: list[FieldError]) -> PolicyError:
    summary = "; ".join(f"{d.field}: {d.message}" for d in details)
    return PolicyError(f"{source}: {len(details)} error(s): {summary}", details=details)


def load_policy(path: Path, *, remote: RemoteRules | None = None) -> Policy:
    """Read and validate a policy file (``remote``: as in :func:`parse_policy`)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy: {exc.strerror}") from exc
    return parse_policy(text, source=str(path), remote=remote)
