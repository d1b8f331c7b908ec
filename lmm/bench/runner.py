"""The memory benchmark: recall after a restart, locality, fluency and speed, per module.

Owns running the scenarios through `ChatEngine` on ONE loaded backend, the per-row records
(every answer is kept) and their summary figures. It does not draw tables or charts
(`lmm.bench.report`) and has no metric definitions of its own (`lmm.bench.metrics`).

Protocol (recall mode, one row per memory module plus two reference rows)
-----------------------------------------------------------------------
* recall: for each scenario, a fresh module (a new `ChatEngine` on the shared backend).
  Session 1: the teach messages, then the distractor messages, each as a chat turn with a
  generated reply (``reply_tokens``) and the module's online update; the state is saved.
  Session 2: a fresh engine on the same backend, the state loaded, no chat history; the
  query is asked (``answer_tokens``) and matched with `metrics.recalls`. Session 2 does not
  learn from the query (its update would come after the answer anyway).
* locality: probe ``j`` is asked (no history) by a fresh engine holding the state saved from
  scenario ``j mod N``, so each probe sees a memory that learned exactly one scenario. Its
  greedy reply is compared with the reply of the plain model (hook removed, computed once
  per run): identical replies (share) and `metrics.token_agreement` (mean).
* fluency: the share of all answers (recall answers and probe answers) that are not
  `metrics.is_degenerate`. `recall_fluent` counts answers that recall AND are fluent, so a
  collapsed module answering "Alice Alice Alice ..." scores on recall but not there.
* reference rows: ``none`` is the identity module (the lower bound; a registered
  ``identity`` module is this row, not run twice): its (empty) state is saved, loaded by a
  fresh engine and the query asked. It skips the session-1 turns: identity has no state,
  so they cannot reach session 2, and their replies would equal the in-context row's
  (identity, greedy) — they would only double that row's cost. ``in-context`` keeps
  the teach and distractor turns in the chat history with no memory and no learning, and
  asks the query in session 1 itself (the upper bound); its probes are asked on top of the
  session-1 history of scenario ``j mod N``.
* speed: decoding tokens/s over the row's first `SPEED_PAIRS` probe replies divided by the
  plain backend's (hook removed) on the same prompts, each plain reply timed right before
  the row's so that both see the same machine load; time to first token (median over all
  answers); update seconds per user message (median, p95); saved state size; state load
  time (median); wall time per row and for the run. Each row starts with one throwaway
  turn (reply + update) so that first-call costs stay out of its figures.

Lifelong mode: all scenarios of a file are taught into ONE memory over K consecutive
sessions (state saved at the end of each and loaded at the start of the next; the chat
history resets between sessions); then a fresh engine with the final state asks every query
with an empty history (cleared before each query). The in-context reference keeps all turns
of all sessions in one history (the engine drops the oldest exchanges when the context
window is full; the row records how many messages were dropped) and asks each query at its
end (the query exchange is removed again before the next query). Probes are asked with the
final memory (or the full history) for locality.

Decoding is greedy with fixed seeds; updates run synchronously (the engine's background
thread gives the same state, `tests/test_engine.py`), so a run is deterministic.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmm.backends.base import Backend
from lmm.backends.decoding import DecodingConfig
from lmm.bench.engines import check_module_options, compute_threads, load_shared_backend, new_engine
from lmm.bench.metrics import median
from lmm.bench.records import (
    answer_record,
    generation_seconds,
    nan_to_none,
    probe_record,
    summarize_row,
    tokens_per_second,
    turn_record,
)
from lmm.bench.scenarios import Scenario, load_distractors, load_probes, load_scenarios
from lmm.chat_format import Message
from lmm.engine import ChatEngine
from lmm.memory import get_memory_spec, memory_names
from lmm.memory.base import GradientMemory
from lmm.models import artifacts_dir

NONE_ROW = "none"
IN_CONTEXT_ROW = "in-context"
IDENTITY = "identity"
REFERENCE_ROWS = (NONE_ROW, IN_CONTEXT_ROW)
CONSOLIDATE = "consolidate"  # row `<module>+consolidate`: the module with --consolidate

# Answer and reply lengths were chosen by measured run time: docs/benchmarks.md.
DEFAULT_ANSWER_TOKENS = 24
DEFAULT_REPLY_TOKENS = 12
# Probes per row whose plain-model reply is re-timed right before the row's reply (tokens/s ratio).
SPEED_PAIRS = 6


@dataclass
class BenchConfig:
    backend: str = "torch"
    model: str | None = None
    modules: list[str] | None = None  # None: every registered module
    scenarios: Path | None = None  # None: benchmarks/facts.jsonl (lifelong: benchmarks/lifelong.jsonl)
    probes: Path = Path("benchmarks/probes.jsonl")
    distractors: Path = Path("benchmarks/distractors.jsonl")
    limit: int | None = None
    module_options: dict[str, dict[str, str]] = field(default_factory=dict)
    out: Path | None = None  # None: <artifacts>/bench
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    reply_tokens: int = DEFAULT_REPLY_TOKENS
    seed: int = 0
    references: bool = True
    lifelong: bool = False
    sessions: int = 5
    layer: int | None = None
    threads: int = 1  # torch intra-op threads; 0: torch's default
    repetition_penalty: float = 1.1  # the chat's default decoding; 1.0: plain greedy
    no_repeat_ngram: int = 0
    memory_contrast: float = DecodingConfig.memory_contrast  # the chat's default; 0: off
    consolidation_options: dict[str, str] = field(default_factory=dict)  # rows <module>+consolidate

    def decoding_options(self) -> dict[str, Any]:
        """The decoding options the benchmark varies, as `new_engine` takes them."""
        return {"repetition_penalty": self.repetition_penalty, "no_repeat_ngram": self.no_repeat_ngram,
                "memory_contrast": self.memory_contrast}

    def scenario_path(self) -> Path:
        if self.scenarios is not None:
            return Path(self.scenarios)
        return Path("benchmarks/lifelong.jsonl" if self.lifelong else "benchmarks/facts.jsonl")

    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else artifacts_dir() / "bench"

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
        out["scenarios"] = str(self.scenario_path())
        out["out"] = str(self.out_dir())
        return out


# --- options ----------------------------------------------------------------------------------
def select_modules(requested: Sequence[str] | None) -> list[str]:
    names = list(requested) if requested else memory_names()
    for name in names:
        if name not in REFERENCE_ROWS:
            base, plus, variant = name.partition("+")
            spec = get_memory_spec(base)
            if plus and (variant != CONSOLIDATE or not issubclass(spec.module_cls, GradientMemory)):
                raise ValueError(f"row {name!r}: the only variant is <gradient module>+{CONSOLIDATE}")
    out: list[str] = []
    for name in names:
        if name not in out:
            out.append(name)
    return out


# --- the runner -----------------------------------------------------------------------------
Advance = Callable[[str], None]


class BenchRunner:
    """Runs the rows of one benchmark on one loaded backend; `run()` returns the JSON-able results."""

    def __init__(self, config: BenchConfig, backend: Backend, *, advance: Advance = lambda desc: None,
                 on_row: Callable[[dict[str, Any]], None] = lambda row: None) -> None:
        self.config = config
        self.backend = backend
        self.advance = advance
        self.on_row = on_row
        distractor_pool = load_distractors(config.distractors) if Path(config.distractors).exists() else []
        scenarios = load_scenarios(config.scenario_path(), distractor_pool)
        if config.limit is not None:
            scenarios = scenarios[: config.limit]
        if not scenarios:
            raise ValueError(f"{config.scenario_path()}: no scenarios to run")
        self.scenarios: list[Scenario] = scenarios
        self.probes: list[str] = load_probes(config.probes)
        self.modules = select_modules(config.modules)
        for module, options in config.module_options.items():
            check_module_options(module, options)
        if config.lifelong and config.sessions < 1:
            raise ValueError(f"--sessions must be >= 1, got {config.sessions}")
        self._plain: list[dict[str, Any]] = []

    # --- rows ---------------------------------------------------------------------------
    def row_names(self) -> list[str]:
        wants_none = self.config.references or IDENTITY in self.modules or NONE_ROW in self.modules
        rows = [NONE_ROW] if wants_none else []
        rows += [m for m in self.modules if m not in (IDENTITY, *REFERENCE_ROWS)]
        if self.config.references or IN_CONTEXT_ROW in self.modules:
            rows.append(IN_CONTEXT_ROW)
        return rows

    def total_steps(self) -> int:
        """Progress units: one per taught scenario, asked query and probe (plus the plain probes)."""
        per_row = 2 * len(self.scenarios) if self.config.lifelong else len(self.scenarios)
        return len(self.probes) + len(self.row_names()) * (per_row + len(self.probes))

    def _options(self, row: str) -> dict[str, str]:
        module = IDENTITY if row in REFERENCE_ROWS else row.partition("+")[0]
        return dict(self.config.module_options.get(module, {}))

    def _engine(self, module: str, options: dict[str, str], max_tokens: int, learning: bool = True) -> ChatEngine:
        """A fresh engine for a row's module (`<module>+consolidate`: with consolidation)."""
        base, _, variant = module.partition("+")
        return new_engine(self.backend, base, options, max_tokens=max_tokens, seed=self.config.seed,
                          learning=learning, layer=self.config.layer, consolidate=variant == CONSOLIDATE,
                          consolidation_options=self.config.consolidation_options,
                          **self.config.decoding_options())

    def run(self) -> dict[str, Any]:
        """Every row, one after another, on this runner's backend."""
        start = time.perf_counter()
        started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            rows = self.run_rows(self.row_names())
        finally:
            self.backend.remove_hook()
            self.backend.reset_session()
        return self.results(rows, self.plain_probes(), started_at, time.perf_counter() - start)

    def run_rows(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """The rows `names` (each from fresh engines; the plain model's probes are computed once)."""
        rows = []
        plain_tps = tokens_per_second(self.plain_probes())
        state_root = Path(tempfile.mkdtemp(prefix="lmm-bench-"))
        try:
            for name in names:
                row_start = time.perf_counter()
                self._warmup(IDENTITY if name in REFERENCE_ROWS else name, self._options(name))
                warmup = time.perf_counter() - row_start
                if self.config.lifelong:
                    row = self._lifelong_row(name, state_root)
                else:
                    row = self._recall_row(name, state_root)
                row["wall_seconds"] = time.perf_counter() - row_start
                row["warmup_seconds"] = warmup
                summarize_row(row, plain_tps)
                rows.append(row)
                self.on_row(row)
        finally:
            shutil.rmtree(state_root, ignore_errors=True)
        return rows

    def backend_meta(self) -> dict[str, Any]:
        """What the results say of the backend the rows ran on."""
        layer = self.backend.num_layers // 2 if self.config.layer is None else self.config.layer
        return {"backend": self.backend.name, "model_id": self.backend.model_id, "layer": layer,
                "torch_threads": compute_threads(self.backend)}

    def results(self, rows: list[dict[str, Any]], plain: list[dict[str, Any]], started_at: str,
                wall_seconds: float, *, meta: dict[str, Any] | None = None, jobs: int = 1) -> dict[str, Any]:
        """The run's JSON: its settings, the backend (`meta`, default this runner's), the plain model's
        probes and the rows in `row_names()` order."""
        cfg = self.config
        order = {name: i for i, name in enumerate(self.row_names())}
        return {
            "kind": "lifelong" if cfg.lifelong else "recall", **(meta or self.backend_meta()), "jobs": jobs,
            "started_at": started_at, "command": " ".join(sys.argv), "config": cfg.to_json(),
            "scenarios_file": str(cfg.scenario_path()), "n_scenarios": len(self.scenarios),
            "probes_file": str(cfg.probes), "n_probes": len(self.probes),
            "locality_pairing": ("probe j is asked with the final lifelong memory" if cfg.lifelong else
                                 "probe j is asked with the state saved from scenario j mod N (N scenarios)"),
            "plain": {"probes": plain, "probe_tps": tokens_per_second(plain),
                      "ttft_median": nan_to_none(median([p["ttft"] for p in plain]))},
            "rows": sorted(rows, key=lambda row: order[row["name"]]),
            "wall_seconds": wall_seconds,
        }

    # --- the plain model ----------------------------------------------------------------
    def plain_probes(self) -> list[dict[str, Any]]:
        """Probe replies of the model with no hook at all: the locality reference and the speed baseline
        (computed on first use)."""
        if self._plain:
            return self._plain
        plain = self._engine(IDENTITY, {}, self.config.answer_tokens, learning=False)
        plain.respond([{"role": "user", "content": "Hello!"}], max_tokens=4, memory=False)  # warm-up
        out = []
        for prompt in self.probes:
            reply = plain.respond([{"role": "user", "content": prompt}], memory=False)
            out.append({"prompt": prompt, "answer": reply.assistant, "tokens": reply.tokens,
                        "generation_tokens": reply.generation_tokens,
                        "generation_seconds": generation_seconds(reply), "ttft": reply.time_to_first_token})
            self.advance("plain model (probes)")
        plain.close()
        self._plain = out
        return out

    def _probe(self, j: int, prompt: str, engine: ChatEngine, source: str | None,
               history: list[Message] | None = None) -> dict[str, Any]:
        messages = list(engine.messages if history is None else history) + [{"role": "user", "content": prompt}]
        plain = None
        if j < SPEED_PAIRS:
            # Time the plain model on the same prompt right before, so that the tokens/s ratio
            # compares two measurements taken under the same machine load.
            plain = engine.respond([{"role": "user", "content": prompt}], max_tokens=self.config.answer_tokens,
                                   memory=False)
        reply = engine.respond(messages, max_tokens=self.config.answer_tokens,
                               fresh_cache=history is None or len(history) == 0)
        record = probe_record(prompt, source, reply, self._plain[j])
        if plain is not None:
            record["paired_plain"] = {"generation_tokens": plain.generation_tokens,
                                      "generation_seconds": generation_seconds(plain),
                                      "ttft": plain.time_to_first_token}
        return record

    def _warmup(self, module: str, options: dict[str, str]) -> None:
        """One throwaway turn (reply + update) so that first-call costs stay out of the figures."""
        engine = self._engine(module, options, min(4, self.config.reply_tokens))
        engine.ask("Hello, this is a warm-up message.")
        engine.close()

    # --- recall mode ----------------------------------------------------------------------
    def _recall_row(self, name: str, state_root: Path) -> dict[str, Any]:
        cfg = self.config
        in_context = name == IN_CONTEXT_ROW
        module = IDENTITY if name in REFERENCE_ROWS else name
        options = self._options(name)
        row: dict[str, Any] = {"name": name, "kind": "reference" if name in REFERENCE_ROWS else "module",
                               "module": None if in_context else module, "options": options,
                               "scenarios": [], "probes": [], "load_seconds": [], "state_bytes": []}
        states: list[Path] = []
        histories: list[list[Message]] = []
        for i, sc in enumerate(self.scenarios):
            self.advance(f"{name}: {sc.name}")
            t_scenario = time.perf_counter()
            engine = self._engine(module, options, cfg.reply_tokens, learning=not in_context)
            turns = []
            dropped = 0
            for text in (*sc.teach, *sc.distractors) if name != NONE_ROW else ():
                before = len(engine.messages)
                turns.append(turn_record(engine.ask(text)))
                dropped += max(0, before + 2 - len(engine.messages))
            record: dict[str, Any] = {"name": sc.name, "query": sc.query, "expect": list(sc.expect), "turns": turns}
            if in_context:
                histories.append(engine.chat_messages())
                engine.set_decoding(max_tokens=cfg.answer_tokens)
                before = len(engine.messages)
                record.update(answer_record(engine.ask(sc.query)))
                dropped += max(0, before + 2 - len(engine.messages))
                record["history_dropped_messages"] = dropped
                engine.close()
            else:
                path = state_root / name / f"{i:04d}.safetensors"
                engine.save_memory(path)
                engine.close()
                states.append(path)
                size = path.stat().st_size
                row["state_bytes"].append(size)
                fresh = self._engine(module, options, cfg.answer_tokens, learning=False)
                t0 = time.perf_counter()
                fresh.load_memory(path)
                row["load_seconds"].append(time.perf_counter() - t0)
                record.update(answer_record(fresh.ask(sc.query)))
                record["state_bytes"] = size
                fresh.close()
            record["wall_seconds"] = time.perf_counter() - t_scenario
            row["scenarios"].append(record)
        t_probes = time.perf_counter()
        for j, prompt in enumerate(self.probes):
            self.advance(f"{name}: probes")
            i = j % len(self.scenarios)
            engine = self._engine(module, options, cfg.answer_tokens, learning=False)
            if in_context:
                row["probes"].append(self._probe(j, prompt, engine, self.scenarios[i].name, histories[i]))
            else:
                t0 = time.perf_counter()
                engine.load_memory(states[i])
                row["load_seconds"].append(time.perf_counter() - t0)
                row["probes"].append(self._probe(j, prompt, engine, self.scenarios[i].name))
            engine.close()
        row["probe_seconds"] = time.perf_counter() - t_probes
        return row

    # --- lifelong mode --------------------------------------------------------------------
    def sessions(self) -> list[list[Scenario]]:
        """The scenarios split into K consecutive sessions whose sizes differ by at most one."""
        k = min(self.config.sessions, len(self.scenarios))
        base, extra = divmod(len(self.scenarios), k)
        out, start = [], 0
        for s in range(k):
            size = base + (1 if s < extra else 0)
            out.append(self.scenarios[start:start + size])
            start += size
        return out

    def _lifelong_row(self, name: str, state_root: Path) -> dict[str, Any]:
        cfg = self.config
        in_context = name == IN_CONTEXT_ROW
        module = IDENTITY if name in REFERENCE_ROWS else name
        options = self._options(name)
        row: dict[str, Any] = {"name": name, "kind": "reference" if name in REFERENCE_ROWS else "module",
                               "module": None if in_context else module, "options": options,
                               "scenarios": [], "probes": [], "turns": [], "load_seconds": [], "state_bytes": [],
                               "sessions": [len(s) for s in self.sessions()]}
        path = state_root / name / "lifelong.safetensors"
        dropped = 0
        engine = None
        for s, chunk in enumerate(self.sessions()):
            if engine is None or not in_context:  # in-context: one history across all sessions
                engine = self._engine(module, options, cfg.reply_tokens, learning=not in_context)
                if s > 0 and not in_context:
                    t0 = time.perf_counter()
                    engine.load_memory(path)
                    row["load_seconds"].append(time.perf_counter() - t0)
            for sc in chunk:
                self.advance(f"{name}: session {s + 1}: {sc.name}")
                for text in (*sc.teach, *sc.distractors) if name != NONE_ROW else ():
                    before = len(engine.messages)
                    record = turn_record(engine.ask(text))
                    record["session"] = s
                    row["turns"].append(record)
                    dropped += max(0, before + 2 - len(engine.messages))
            if not in_context:
                engine.save_memory(path)
                row["state_bytes"].append(path.stat().st_size)
                engine.close()
        assert engine is not None
        if in_context:
            history = engine.chat_messages()
            engine.set_decoding(max_tokens=cfg.answer_tokens)
            engine.learning = False
            kept = list(engine.messages)
        else:
            engine = self._engine(module, options, cfg.answer_tokens, learning=False)
            t0 = time.perf_counter()
            engine.load_memory(path)
            row["load_seconds"].append(time.perf_counter() - t0)
            history = None
        for sc in self.scenarios:
            self.advance(f"{name}: {sc.name}?")
            if in_context:
                engine.messages = list(kept)
                before = len(engine.messages)
                turn = engine.ask(sc.query)
                dropped += max(0, before + 2 - len(engine.messages))
            else:
                engine.reset_chat()
                turn = engine.ask(sc.query)
            row["scenarios"].append({"name": sc.name, "query": sc.query, "expect": list(sc.expect),
                                     **answer_record(turn)})
        for j, prompt in enumerate(self.probes):
            self.advance(f"{name}: probes")
            if in_context:
                row["probes"].append(self._probe(j, prompt, engine, "all sessions", history))
            else:
                row["probes"].append(self._probe(j, prompt, engine, "lifelong memory", []))
        engine.close()
        row["history_dropped_messages"] = dropped
        return row


def run_benchmark(config: BenchConfig, backend: Backend | None = None, *, progress: bool = True,
                  jobs: int = 1) -> dict[str, Any]:
    """Run every row with a progress bar on stderr and return the results: on `backend` (loaded here
    when None), or over `jobs` > 1 worker processes that each load their own (`lmm.bench.parallel`;
    the bar then counts finished rows)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if jobs > 1 and backend is not None:
        raise ValueError("jobs > 1 runs rows in worker processes, each with its own backend: pass no backend")
    console = Console(stderr=True)
    columns = (TextColumn("[progress.description]{task.description:<44}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("starting", total=None)

        def on_row(row: dict[str, Any]) -> None:
            s = row["summary"]
            fluency = "–" if s["fluency"] is None else f"{s['fluency']:.2f}"
            locality = "–" if s["locality"] is None else f"{s['locality']:.2f}"
            console.print(f"{row['name']}: recall {s['recalled']}/{s['n']}, locality {locality}, "
                          f"fluency {fluency}, {row['wall_seconds']:.0f} s", highlight=False)
            if jobs > 1:
                bar.update(task, advance=1, description=f"{row['name']} done")

        if jobs > 1:
            from lmm.bench.parallel import run_parallel

            planner = BenchRunner(config, backend=None)  # type: ignore[arg-type]  # the workers load their own
            bar.update(task, total=len(planner.row_names()), description=f"rows over {jobs} processes")
            results = run_parallel(planner, jobs, on_row)
        else:
            owned = backend is None
            backend = backend or load_shared_backend(config.backend, config.model, config.threads)
            runner = BenchRunner(config, backend,
                                 advance=lambda desc: bar.update(task, advance=1, description=desc[:44]),
                                 on_row=on_row)
            bar.update(task, total=runner.total_steps())
            try:
                results = runner.run()
            finally:
                if owned:
                    backend.close()
        bar.update(task, description="done")
    return results
