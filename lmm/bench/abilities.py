"""The ability benchmark: does a memory hold up the way a person's would?

Owns the ability cases (one JSONL file per ability in a folder, plus `unrelated.jsonl`), how each
row is taught and asked, and the per-ability scores. A case is taught over one or more chat
sessions (one engine each, the memory saved and loaded between them), followed by distractor
turns, and its question is asked after a restart with no history:

    {"name": "cabin_wifi", "teach": ["The wifi password at the cabin is ..."],
     "query": "What is the wifi password at the cabin?", "expect": ["..."]}
    {"name": "moved", "sessions": [["I live in Porto."], ["We moved to Ghent last week."]],
     "query": "Where do I live?", "expect": ["Ghent"], "reject": ["Porto"]}
    {"name": "never_told", "teach": ["My dog is called Rex."], "query": "What is my cat's name?",
     "expect": [], "reject": ["Rex"]}

A case passes when the answer holds one `expect` keyword (none needed when `expect` is empty:
an abstention case) and no `reject` keyword. `evidence` (default: every taught message) is what
the oracle row holds in context. Rows: `none` (the plain model), each memory module, `in-context`
(everything taught kept in one chat's history) and `oracle` (the evidence, then the question, no
memory). Module rows are also run *crowded*: every case taught into one memory, each question
asked alone, and the `unrelated.jsonl` prompts asked with that memory (identical replies to the
plain model's count as untouched). Identity confusion: among answers holding an expected keyword,
the share that says it in the first person ("I am Alice" to "What is my name?"), as if the user's
facts were the assistant's. LoCoMo conversations come in through `lmm.bench.locomo`.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmm.backends.base import Backend
from lmm.backends.decoding import DecodingConfig
from lmm.bench.engines import new_engine
from lmm.bench.metrics import is_degenerate, recalls
from lmm.bench.scenarios import ScenarioError, _iter_objects, _text, _texts, load_probes
from lmm.engine import ChatEngine

NONE_ROW, IN_CONTEXT_ROW, ORACLE_ROW = "none", "in-context", "oracle"
UNRELATED_FILE = "unrelated.jsonl"


@dataclass(frozen=True)
class Case:
    name: str
    ability: str
    sessions: tuple[tuple[str, ...], ...]  # user messages, per chat session
    query: str
    expect: tuple[str, ...]
    reject: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()  # what the oracle row holds in context
    distractors: tuple[str, ...] = ()  # said after the last session's teaching
    match: str = "any"  # any: one expect keyword is enough; half: at least half of them (LoCoMo answers)

    @property
    def taught(self) -> tuple[str, ...]:
        return tuple(m for s in self.sessions for m in s)


def passes(answer: str, case: Case) -> bool:
    if case.match == "half":
        found = sum(recalls(answer, [word]) for word in case.expect)
        return 2 * found >= len(case.expect) and not recalls(answer, case.reject)
    return (not case.expect or recalls(answer, case.expect)) and not recalls(answer, case.reject)


_FIRST_PERSON = re.compile(r"(?<![\w'])(i|i'm|i am|my|me)(?![\w'])", re.IGNORECASE)
_SENTENCES = re.compile(r"(?<=[.!?])\s+")


def takes_identity(answer: str, case: Case) -> bool:
    """The answer states an expected keyword in the first person (a measurement on English
    output: "I am Alice." to "What is my name?")."""
    return any(recalls(s, case.expect) and _FIRST_PERSON.search(s) for s in _SENTENCES.split(answer))


def load_cases(folder: Path, pool: Sequence[str], distractors: int = 3) -> tuple[list[Case], list[str]]:
    """Every `<ability>.jsonl` of `folder` (the file's stem names the ability) and its unrelated prompts."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.jsonl") if p.name != UNRELATED_FILE)
    if not files:
        raise ValueError(f"{folder}: no ability files (<ability>.jsonl)")
    cases: list[Case] = []
    cursor = 0
    for path in files:
        for lineno, obj in _iter_objects(path):
            name = _text(path, lineno, obj, "name")
            if "sessions" in obj:
                raw = obj["sessions"]
                if not isinstance(raw, list) or not raw:
                    raise ScenarioError(path, lineno, "sessions", "must be a non-empty list of lists of strings")
                sessions = tuple(_texts(path, lineno, "sessions", s, allow_empty=False) for s in raw)
            else:
                sessions = (_texts(path, lineno, "teach", obj.get("teach"), allow_empty=False),)
            expect = _texts(path, lineno, "expect", obj.get("expect"), allow_empty=True)
            reject = _texts(path, lineno, "reject", obj.get("reject", []), allow_empty=True)
            if not expect and not reject:
                raise ScenarioError(path, lineno, "expect", "an empty expect needs a reject list (abstention)")
            evidence = _texts(path, lineno, "evidence", obj.get("evidence", []), allow_empty=True)
            n = obj.get("distractors", distractors)
            picked = tuple(pool[(cursor + i) % len(pool)] for i in range(n)) if pool else ()
            cursor += n
            cases.append(Case(name=f"{path.stem}/{name}", ability=path.stem, sessions=sessions,
                              query=_text(path, lineno, obj, "query"), expect=expect, reject=reject,
                              evidence=evidence or tuple(m for s in sessions for m in s), distractors=picked))
    return cases, load_unrelated(folder)


def load_unrelated(folder: Path) -> list[str]:
    """`folder`'s unrelated prompts (none when it has no `unrelated.jsonl`)."""
    path = Path(folder) / UNRELATED_FILE
    return load_probes(path) if path.exists() else []


@dataclass
class AbilityConfig:
    modules: list[str] = field(default_factory=lambda: ["trace_bank"])
    module_options: dict[str, dict[str, str]] = field(default_factory=dict)
    references: bool = True  # the none, in-context and oracle rows
    separate: bool = True  # each case on its own memory (besides the crowded run)
    answer_tokens: int = 48
    reply_tokens: int = 12
    seed: int = 0
    repetition_penalty: float = 1.1
    memory_contrast: float = DecodingConfig.memory_contrast


class AbilityRun:
    """Teaches and asks the rows of one ability (or LoCoMo) benchmark on one loaded backend."""

    def __init__(self, backend: Backend, config: AbilityConfig,
                 advance: Callable[[str], None] = lambda desc: None) -> None:
        self.backend, self.config, self.advance = backend, config, advance
        self.root = Path(tempfile.mkdtemp(prefix="lmm-abilities-"))
        self._plain: dict[str, list[int]] = {}

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def engine(self, module: str, max_tokens: int, learning: bool = True) -> ChatEngine:
        return new_engine(self.backend, module, self.config.module_options.get(module, {}), max_tokens=max_tokens,
                          seed=self.config.seed, learning=learning,
                          repetition_penalty=self.config.repetition_penalty,
                          memory_contrast=self.config.memory_contrast)

    # --- teaching and asking ---------------------------------------------------------------------------
    def teach(self, module: str, sessions: Sequence[Sequence[str]], path: Path) -> dict[str, Any]:
        """Each session in its own engine, the memory carried through `path`; figures of the writes."""
        writes: list[float] = []
        for session in sessions:
            eng = self.engine(module, self.config.reply_tokens)
            try:
                if path.exists():
                    eng.load_memory(path)
                for text in session:
                    turn = eng.ask(text)
                    if turn.update is not None:
                        writes.append(turn.update.seconds)
                eng.save_memory(path)
            finally:
                eng.close()
        return {"write_seconds": writes, "state_bytes": path.stat().st_size if path.exists() else 0}

    def ask(self, module: str, path: Path | None, query: str, history: Sequence[str] = ()) -> dict[str, Any]:
        """`query` in a fresh chat: with the memory at `path`, or after `history` (no memory)."""
        eng = self.engine(module, self.config.reply_tokens, learning=False)
        try:
            if path is not None:
                eng.load_memory(path)
            for text in history:
                eng.ask(text)
            eng.set_decoding(max_tokens=self.config.answer_tokens)
            turn = eng.ask(query)
            route = getattr(eng.module, "last_route", None)
            return {"answer": turn.assistant, "tokens": turn.tokens, "ttft": turn.time_to_first_token,
                    "read": list(route.get("traces", [])) if route else []}
        finally:
            eng.close()

    def plain(self, prompt: str) -> list[int]:
        if prompt not in self._plain:
            self._plain[prompt] = self.ask("identity", None, prompt)["tokens"]
        return self._plain[prompt]

    # --- rows -------------------------------------------------------------------------------------------
    def rows(self) -> list[str]:
        refs = [NONE_ROW] if self.config.references else []
        after = [IN_CONTEXT_ROW, ORACLE_ROW] if self.config.references else []
        return refs + [m for m in self.config.modules] + after

    def separate(self, row: str, cases: Sequence[Case]) -> list[dict[str, Any]]:
        """Each case on a fresh memory (module rows) or a fresh chat (reference rows)."""
        out = []
        for i, case in enumerate(cases):
            self.advance(f"{row}: {case.name}")
            if row == NONE_ROW:
                got = self.ask("identity", None, case.query)
            elif row == IN_CONTEXT_ROW:
                got = self.ask("identity", None, case.query, history=(*case.taught, *case.distractors))
            elif row == ORACLE_ROW:
                got = self.ask("identity", None, case.query, history=case.evidence)
            else:
                path = self.root / row / f"{i:04d}.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                sessions = [*case.sessions[:-1], (*case.sessions[-1], *case.distractors)]
                taught = self.teach(row, sessions, path)
                got = {**self.ask(row, path, case.query), **taught}
            out.append(score(case, got))
        return out

    def crowded(self, module: str, cases: Sequence[Case], unrelated: Sequence[str],
                sessions: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
        """Every case's sessions (or the given `sessions`) taught into ONE memory, then each question
        and each unrelated prompt asked alone with it."""
        path = self.root / f"{module}-crowded.safetensors"
        path.unlink(missing_ok=True)
        taught = list(sessions) if sessions is not None else [s for c in cases for s in c.sessions]
        t0 = time.perf_counter()
        self.advance(f"{module}: teaching {len(taught)} sessions into one memory")
        teaching = self.teach(module, taught, path)
        teaching["teach_seconds"] = time.perf_counter() - t0
        answers = []
        for case in cases:
            self.advance(f"{module} crowded: {case.name}")
            answers.append(score(case, self.ask(module, path, case.query)))
        probes = []
        for prompt in unrelated:
            self.advance(f"{module} crowded: unrelated")
            got = self.ask(module, path, prompt)
            probes.append({"prompt": prompt, "answer": got["answer"], "read": got["read"], "degenerate":
                           is_degenerate(got["answer"]), "identical": got["tokens"] == self.plain(prompt)})
        return {"cases": answers, "unrelated": probes, **teaching}


def score(case: Case, got: dict[str, Any]) -> dict[str, Any]:
    answer = got["answer"]
    return {"name": case.name, "ability": case.ability, "query": case.query, "expect": list(case.expect),
            "reject": list(case.reject), "pass": passes(answer, case),
            "identity_taken": takes_identity(answer, case) if case.expect else False,
            "degenerate": is_degenerate(answer), **{k: v for k, v in got.items() if k != "tokens"}}


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Passes per ability, identity confusion among answers that hold the expected value."""
    by: dict[str, list[bool]] = {}
    for r in records:
        by.setdefault(r["ability"], []).append(r["pass"])
    holding = [r for r in records if r["expect"] and recalls(r["answer"], r["expect"])]
    return {"abilities": {k: [sum(v), len(v)] for k, v in sorted(by.items())},
            "passed": [sum(r["pass"] for r in records), len(records)],
            "identity_taken": [sum(r["identity_taken"] for r in holding), len(holding)],
            "degenerate": [sum(r["degenerate"] for r in records), len(records)]}


def run_abilities(run: AbilityRun, cases: Sequence[Case], unrelated: Sequence[str],
                  conversation: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
    """Every row of `run` on `cases`. With a `conversation` (LoCoMo), module rows learn it, in order,
    as one memory; without one, module rows run each case alone and then all of them crowded."""
    started = time.perf_counter()
    rows = []
    for row in run.rows():
        t0 = time.perf_counter()
        if row == IN_CONTEXT_ROW and conversation is not None:
            continue  # a whole long conversation does not fit the context window
        result: dict[str, Any] = {"name": row}
        if row in (NONE_ROW, IN_CONTEXT_ROW, ORACLE_ROW):
            result["separate"] = run.separate(row, cases)
        else:
            if conversation is None and run.config.separate:
                result["separate"] = run.separate(row, cases)
            result["crowded"] = run.crowded(row, cases, unrelated, conversation)
        for mode in ("separate", "crowded"):
            if mode in result:
                records = result[mode] if mode == "separate" else result[mode]["cases"]
                result[f"{mode}_summary"] = summarize(records)
        result["wall_seconds"] = time.perf_counter() - t0
        rows.append(result)
    return {"kind": "abilities", "rows": rows, "n_cases": len(cases), "n_unrelated": len(unrelated),
            "wall_seconds": time.perf_counter() - started}


def format_table(results: dict[str, Any]) -> str:
    """One line per row and mode: passes per ability, identity confusion, unrelated prompts untouched."""
    abilities = sorted({a for row in results["rows"] for mode in ("separate", "crowded")
                        for a in row.get(f"{mode}_summary", {}).get("abilities", {})})
    head = ["row", "memory", *abilities, "all", "identity taken", "degenerate", "unrelated untouched",
            "write med s", "state"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["rows"]:
        for mode in ("separate", "crowded"):
            summary = row.get(f"{mode}_summary")
            if summary is None:
                continue
            memory = "one for all" if mode == "crowded" else ("one per case" if "crowded" in row else "-")
            cells = [row["name"], memory]
            cells += [_frac(summary["abilities"].get(a)) for a in abilities]
            cells += [_frac(summary["passed"]), _frac(summary["identity_taken"]), _frac(summary["degenerate"])]
            crowd = row.get("crowded") if mode == "crowded" else None
            if crowd is not None:
                probes = crowd["unrelated"]
                writes = sorted(crowd["write_seconds"])
                cells += [_frac([sum(p["identical"] for p in probes), len(probes)]),
                          f"{writes[len(writes) // 2]:.2f}" if writes else "-", _bytes(crowd["state_bytes"])]
            else:
                cells += ["-", "-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _frac(pair: Sequence[int] | None) -> str:
    return "-" if not pair else f"{pair[0]}/{pair[1]}"


def _bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"
