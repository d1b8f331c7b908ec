"""`python -m lmm.bench --scale 10,100,1000`: how one memory holds up as it grows.

Owns the seeded generator of synthetic facts (made-up names and places in several sentence
shapes, each with its question; none of them is a benchmark fact) and the scale run: facts are
written one after another into ONE memory of the chosen module (its direct write path, the
update that follows a user message, no replies), and at each checkpoint N a sample of the facts
taught so far is asked with no history. Per N it reports recall (and, once, the same sample
asked with only its own fact in memory), unrelated prompts whose reply stays the plain
model's, write time, routing time (the module's `select`, both stages), time to first token,
bytes per fact (the saved file), and the load time of that file; a PNG plots them against N.
Routing time is the module's `select` for a new message (encoding it included); "first stage"
is the same message's first stage again, its states cached: the index lookup alone.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmm.backends.base import Backend
from lmm.bench.engines import new_engine
from lmm.bench.metrics import recalls

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kl", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "n", "r", "l", "s", "th", "nd", "x")
SHAPES = (
    ("My friend {a} lives in {b}.", "Where does my friend {a} live?"),
    ("The {a} club meets at {b} Hall.", "Where does the {a} club meet?"),
    ("The password for the {a} account is {b}.", "What is the password for the {a} account?"),
    ("I bought my {a} lamp in {b}.", "Where did I buy my {a} lamp?"),
    ("Our neighbour {a} works as a {b} trainer.", "What does our neighbour {a} work as?"),
)
UNRELATED = ("I need a simple recipe for pancakes.", "Can you help me write a short poem about autumn?",
             "What is the tallest mountain in Europe?", "I have a job interview tomorrow. Any tips?",
             "Explain why leaves change colour.", "We want to paint our living room. Which colours are calming?")


@dataclass(frozen=True)
class Fact:
    statement: str
    question: str
    answer: str


def made_up_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def generate_facts(n: int, seed: int = 0) -> list[Fact]:
    """`n` facts with distinct made-up keys and values, cycling through the sentence shapes."""
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            word = made_up_word(rng, syllables).capitalize()
            if word not in used:
                used.add(word)
                return word

    facts = []
    for i in range(n):
        statement, question = SHAPES[i % len(SHAPES)]
        a, b = fresh(2), fresh(3)
        facts.append(Fact(statement.format(a=a, b=b), question.format(a=a), b))
    return facts


def run_scale(backend: Backend, module: str, options: dict[str, str], sizes: Sequence[int], *, sample: int = 24,
              answer_tokens: int = 24, seed: int = 0, advance: Callable[[str], None] = lambda d: None,
              states: Path | None = None) -> dict[str, Any]:
    """The scale rows; the memory at each N is kept as `<states>/<N>.safetensors` (None: in a temporary
    folder removed at the end)."""
    sizes = sorted(set(sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError("--scale needs sizes >= 1, e.g. 10,100,1000")
    facts = generate_facts(sizes[-1], seed)
    rng = random.Random(seed + 1)
    root = Path(tempfile.mkdtemp(prefix="lmm-scale-")) if states is None else states
    root.mkdir(parents=True, exist_ok=True)

    def engine() -> Any:
        return new_engine(backend, module, options, max_tokens=answer_tokens, seed=seed, learning=False)

    plain = engine()
    baseline = {p: plain.respond([{"role": "user", "content": p}], memory=False).tokens for p in UNRELATED}
    plain.close()
    eng = new_engine(backend, module, options, max_tokens=answer_tokens, seed=seed)
    rows, writes, taught = [], [], 0
    alone: dict[int, bool] = {}
    try:
        for n in sizes:
            while taught < n:
                if taught % 50 == 0:
                    advance(f"{module}: writing fact {taught + 1}/{sizes[-1]}")
                t0 = time.perf_counter()
                eng.module.write([{"role": "user", "content": facts[taught].statement}], 0)
                writes.append(time.perf_counter() - t0)
                taught += 1
            path = eng.save_memory(root / f"{n}.safetensors")
            asked = sorted(rng.sample(range(n), min(sample, n)))
            row = _measure(eng, engine, path, facts, asked, baseline, advance, n)
            row["write_ms_median"] = 1000 * statistics.median(writes[-min(len(writes), 200):])
            for i in asked:  # the same facts with only their own statement in memory (once per fact)
                if i not in alone and len(alone) < 2 * sample:
                    alone[i] = _alone(engine, facts[i])
            known = [i for i in asked if i in alone]
            row["alone_recall"] = [sum(alone[i] for i in known), len(known)]
            row["recall_on_alone_sample"] = [sum(row["hits"][asked.index(i)] for i in known), len(known)]
            rows.append(row)
    finally:
        eng.close()
        if states is None:
            shutil.rmtree(root, ignore_errors=True)
    return {"kind": "scale", "module": module, "options": options, "sizes": sizes, "rows": rows, "seed": seed}


def _alone(engine: Callable[[], Any], fact: Fact) -> bool:
    eng = engine()
    try:
        eng.module.write([{"role": "user", "content": fact.statement}], 0)
        return recalls(eng.respond([{"role": "user", "content": fact.question}]).assistant, [fact.answer])
    finally:
        eng.close()


def _measure(teacher: Any, engine: Callable[[], Any], path: Path, facts: Sequence[Fact], asked: Sequence[int],
             baseline: dict[str, list[int]], advance: Callable[[str], None], n: int) -> dict[str, Any]:
    fresh = engine()
    try:
        t0 = time.perf_counter()
        fresh.load_memory(path)
        load = time.perf_counter() - t0
        hits, route_ms, index_ms, ttft = [], [], [], []
        for i in asked:
            advance(f"N={n}: asking")
            t0 = time.perf_counter()
            fresh.module.select(facts[i].question)
            route_ms.append(1000 * (time.perf_counter() - t0))
            if hasattr(fresh.module, "margins"):  # the first stage again, the message's states now cached
                t0 = time.perf_counter()
                fresh.module.margins(facts[i].question)
                index_ms.append(1000 * (time.perf_counter() - t0))
            turn = fresh.respond([{"role": "user", "content": facts[i].question}])
            hits.append(recalls(turn.assistant, [facts[i].answer]))
            ttft.append(turn.time_to_first_token)
        untouched = [fresh.respond([{"role": "user", "content": p}]).tokens == baseline[p] for p in UNRELATED]
    finally:
        fresh.close()
    return {"n": n, "recall": [sum(hits), len(hits)], "hits": hits, "unrelated_untouched": [sum(untouched),
            len(untouched)], "route_ms_median": statistics.median(route_ms),
            "index_ms_median": statistics.median(index_ms) if index_ms else None,
            "ttft_median": statistics.median(ttft),
            "bytes_per_fact": path.stat().st_size / n, "load_seconds": load,
            "traces": len(getattr(teacher.module, "traces", []))}


def format_scale(results: dict[str, Any]) -> str:
    head = ["N", "recall", "same facts alone", "unrelated untouched", "write ms", "routing ms", "first stage ms",
            "TTFT s", "bytes/fact", "load s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results["rows"]:
        lines.append("| " + " | ".join([
            str(r["n"]), f"{r['recall'][0]}/{r['recall'][1]}",
            f"{r['recall_on_alone_sample'][0]}/{r['alone_recall'][0]} of {r['alone_recall'][1]}",
            f"{r['unrelated_untouched'][0]}/{r['unrelated_untouched'][1]}", f"{r['write_ms_median']:.0f}",
            f"{r['route_ms_median']:.0f}", "-" if r.get("index_ms_median") is None else f"{r['index_ms_median']:.1f}",
            f"{r['ttft_median']:.2f}", f"{r['bytes_per_fact']:.0f}",
            f"{r['load_seconds']:.3f}"]) + " |")
    return "\n".join(lines)


def plot_scale(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    ns = [r["n"] for r in rows]
    panels = [("recall", [r["recall"][0] / max(r["recall"][1], 1) for r in rows]),
              ("unrelated untouched", [r["unrelated_untouched"][0] / r["unrelated_untouched"][1] for r in rows]),
              ("write ms (median)", [r["write_ms_median"] for r in rows]),
              ("routing ms (median)", [r["route_ms_median"] for r in rows]),
              ("TTFT s (median)", [r["ttft_median"] for r in rows]),
              ("bytes per fact", [r["bytes_per_fact"] for r in rows]),
              ("load s", [r["load_seconds"] for r in rows])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3))
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.plot(ns, values, marker="o")
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("facts in one memory", fontsize=8)
    fig.suptitle(f"{results['module']}: one memory, N facts", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
