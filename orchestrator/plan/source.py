"""Line-aware YAML loading for plans.

A plan with a mistake must be rejected with *file, line and what to fix*. PyYAML
gives us the position of every node when we compose the document, and pydantic
gives us the location of every error as a path like ``('nodes', 1, 'mac')``. This
module keeps the composed node tree beside the plain data so any path can be
turned back into a line (``Source.line_of``).

It also rejects what PyYAML silently accepts: a mapping with the same key twice
(PyYAML keeps the last one; a plan with two ``mac:`` lines is a mistake, not a
preference).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml


class PlanLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 numbers.

    YAML 1.1 reads ``52:54:00:00:00:01`` -- an unquoted MAC address -- as the
    sexagesimal integer 41135040001. Plans are full of MACs, so the int and
    float resolvers here are YAML 1.1's minus the ``:`` forms.
    """


PlanLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
PlanLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
PlanLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    """One thing wrong with a plan. ``severity`` is "error" or "warning"."""

    file: str
    line: int | None
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        tag = "" if self.severity == "error" else f"{self.severity}: "
        return f"{where}: {tag}{self.message}"


class PlanError(Exception):
    """A plan that cannot be used. ``problems`` lists every error found (and warnings)."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.severity != "error", p.file, p.line or 0))
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


@dataclass(slots=True)
class Source:
    """A loaded YAML document: the data plus the node tree for line lookups."""

    path: str
    data: Any
    root: yaml.Node | None
    problems: list[Problem] = field(default_factory=list)

    def line_of(self, loc: Iterable[Any], *, key: bool = False) -> int | None:
        """1-based line of the node at ``loc``; the deepest existing node if part is missing.

        Path elements that do not name a mapping key or a sequence index (pydantic
        adds union-member tags such as ``'function-after[...]'``) are skipped.
        With ``key=True`` the line of the last mapping *key* is returned (where an
        unknown key is written) rather than of its value.
        """
        node = self.root
        if node is None:
            return None
        best = node.start_mark.line + 1
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                        best = (k if key else v).start_mark.line + 1
                        node = v
                        break
                else:
                    continue
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if 0 <= part < len(node.value):
                    node = node.value[part]
                    best = node.start_mark.line + 1
            # scalars: nothing deeper
        return best


def _duplicate_keys(path: str, node: yaml.Node | None) -> list[Problem]:
    out: list[Problem] = []
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    line = k.start_mark.line + 1
                    if k.value in seen and k.value != "<<":
                        out.append(
                            Problem(
                                path,
                                line,
                                f"duplicate key {k.value!r} (first on line {seen[k.value]}); "
                                "YAML keeps only the last one, so remove or merge one of them",
                            )
                        )
                    seen.setdefault(k.value, line)
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return out


def load_yaml(path: str | Path, text: str | None = None) -> Source:
    """Load one YAML document; syntax errors become Problems, never tracebacks."""
    spath = str(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PlanError([Problem(spath, None, "no such file")]) from None
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError([Problem(spath, None, f"cannot read: {e}")]) from None
    try:
        loader = PlanLoader(text)
        try:
            root = loader.get_single_node()
            dups = _duplicate_keys(spath, root)
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        what = e.problem or str(e)
        ctx = f" ({e.context})" if e.context else ""
        raise PlanError([Problem(spath, line, f"YAML syntax error: {what}{ctx}")]) from None
    except yaml.YAMLError as e:
        raise PlanError([Problem(spath, None, f"YAML error: {e}")]) from None
    if dups:
        raise PlanError(dups)
    return Source(spath, data, root)
