"""Typed loaders for the benchmark JSONL files.

File formats (one JSON object per line; blank lines are ignored):

* scenarios (``facts.jsonl``, ``lifelong.jsonl``, your own files)::

    {"name": "person_sister_name",
     "teach": ["My sister's name is Priya."],
     "distractors": 5,
     "query": "What is my sister's name?",
     "expect": ["Priya"]}

  ``teach`` is a non-empty list of user messages that state the fact.
  ``distractors`` is either a list of user messages said after the teaching, or
  an int ``n``: take the next ``n`` messages from the shared distractor pool.
  The pool is walked round-robin with one cursor per file, so the result is
  deterministic and consecutive scenarios get different distractors.
  ``expect`` is a non-empty list of keywords; an answer that contains any one of
  them (see :func:`lmm.bench.metrics.recalls`) counts as recalled.
  Extra keys are ignored.  ``name`` must be unique within a file.

* distractors (``distractors.jsonl``): ``{"text": "..."}``
* probes (``probes.jsonl``): ``{"prompt": "..."}``

Any malformed input raises :class:`ScenarioError` naming the file, the line and
the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Scenario",
    "ScenarioError",
    "load_distractors",
    "load_probes",
    "load_scenarios",
]

PathLike = str | os.PathLike[str]


class ScenarioError(ValueError):
    """A benchmark file is malformed.  ``path``, ``line`` and ``field`` say where."""

    def __init__(self, path: PathLike, line: int | None, field: str | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = self.path
        if line is not None:
            where += f": line {line}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Scenario:
    """One fact to teach and ask about later."""

    name: str
    teach: tuple[str, ...]
    distractors: tuple[str, ...]
    query: str
    expect: tuple[str, ...]


def _iter_objects(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for every non-blank line of a JSONL file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(path, None, None, f"cannot read file: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ScenarioError(path, None, None, f"not valid UTF-8: {exc}") from exc
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ScenarioError(path, lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise ScenarioError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _require(path: PathLike, lineno: int, obj: dict[str, Any], field: str) -> Any:
    if field not in obj:
        raise ScenarioError(path, lineno, field, "missing")
    return obj[field]


def _text(path: PathLike, lineno: int, obj: dict[str, Any], field: str) -> str:
    value = _require(path, lineno, obj, field)
    if not isinstance(value, str):
        raise ScenarioError(path, lineno, field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ScenarioError(path, lineno, field, "must not be empty")
    return value


def _texts(path: PathLike, lineno: int, field: str, value: Any, *, allow_empty: bool) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ScenarioError(path, lineno, field, f"must be a list of strings, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ScenarioError(path, lineno, field, "must not be empty")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ScenarioError(path, lineno, field, f"item {i} must be a string, got {type(item).__name__}")
        if not item.strip():
            raise ScenarioError(path, lineno, field, f"item {i} must not be empty")
    return tuple(value)


def load_scenarios(path: PathLike, distractor_pool: Sequence[str]) -> list[Scenario]:
    """Load scenarios from ``path``, resolving int ``distractors`` from ``distractor_pool``."""
    pool = list(distractor_pool)
    cursor = 0
    seen: dict[str, int] = {}
    scenarios: list[Scenario] = []
    for lineno, obj in _iter_objects(path):
        name = _text(path, lineno, obj, "name")
        if name in seen:
            raise ScenarioError(
                path, lineno, "name", f"duplicate name {name!r} (first used on line {seen[name]})"
            )
        seen[name] = lineno
        teach = _texts(path, lineno, "teach", _require(path, lineno, obj, "teach"), allow_empty=False)
        raw = _require(path, lineno, obj, "distractors")
        if isinstance(raw, bool) or not isinstance(raw, (int, list)):
            raise ScenarioError(
                path, lineno, "distractors", f"must be an int or a list of strings, got {type(raw).__name__}"
            )
        if isinstance(raw, int):
            if raw < 0:
                raise ScenarioError(path, lineno, "distractors", f"must not be negative, got {raw}")
            if raw > len(pool):
                raise ScenarioError(
                    path, lineno, "distractors", f"asks for {raw} messages but the pool has only {len(pool)}"
                )
            distractors = tuple(pool[(cursor + i) % len(pool)] for i in range(raw))
            if pool:
                cursor = (cursor + raw) % len(pool)
        else:
            distractors = _texts(path, lineno, "distractors", raw, allow_empty=True)
        query = _text(path, lineno, obj, "query")
        expect = _texts(path, lineno, "expect", _require(path, lineno, obj, "expect"), allow_empty=False)
        scenarios.append(Scenario(name, teach, distractors, query, expect))
    return scenarios


def _load_single_field(path: PathLike, field: str) -> list[str]:
    return [_text(path, lineno, obj, field) for lineno, obj in _iter_objects(path)]


def load_probes(path: PathLike) -> list[str]:
    """Load locality probes: one ``{"prompt": ...}`` per line."""
    return _load_single_field(path, "prompt")


def load_distractors(path: PathLike) -> list[str]:
    """Load the shared distractor pool: one ``{"text": ...}`` per line."""
    return _load_single_field(path, "text")
