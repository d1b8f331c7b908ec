"""Reproduce docs/consolidation.md's development tables: each dev fact consolidated into a fresh module.

Each fact of the development set is taught with `--consolidate` to a fresh module, which is saved and
loaded by a new engine (no chat history); the fact's question is asked and five dev unrelated prompts
are compared with the plain model's replies. Prints one JSON line per fact (recalled, unrelated replies
identical, the largest drift of its statements, the questions learned) and the totals. With
`--crowded`, every fact goes into ONE memory (the lifelong case) and every unrelated prompt is asked
with it, `--probes` too (the dev counterpart of benchmarks/probes.jsonl).

    python scripts/dev_consolidation.py --module chaptered_bank --limit 12 --consolidate-opt max_drift=1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from lmm.bench.engines import load_shared_backend, new_engine, parse_module_options
from lmm.bench.metrics import recalls
from lmm.bench.scenarios import load_probes

UNRELATED_PER_FACT = 5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--module", default="chaptered_bank")
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--facts", type=Path, default=Path("benchmarks/dev/facts.jsonl"))
    p.add_argument("--unrelated", type=Path, default=Path("benchmarks/dev/unrelated.jsonl"))
    p.add_argument("--probes", type=Path, default=Path("benchmarks/dev/probes.jsonl"))
    p.add_argument("--crowded", action="store_true", help="every fact into one memory, then every question")
    p.add_argument("--mm-opt", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--consolidate-opt", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    options = parse_module_options(args.mm_opt, scoped=False)
    consolidation = parse_module_options(args.consolidate_opt, scoped=False)
    facts = [json.loads(line) for line in args.facts.read_text().splitlines() if line.strip()][: args.limit]
    unrelated = load_probes(args.unrelated) + (load_probes(args.probes) if args.crowded else [])
    backend = load_shared_backend("torch", None, threads=1)
    plain = new_engine(backend, "identity", {}, max_tokens=24, seed=0, learning=False)
    reference = {q: plain.respond([{"role": "user", "content": q}], memory=False).assistant for q in unrelated}
    plain.close()
    if args.crowded:
        crowded(backend, args.module, options, consolidation, facts, reference)
        return
    recalled = same = 0
    for k, fact in enumerate(facts):
        teach = new_engine(backend, args.module, options, max_tokens=12, seed=0, consolidate=True,  # type: ignore[arg-type]
                           consolidation_options=consolidation)  # type: ignore[arg-type]
        drifts, seconds, questions = [], [], []
        for text in fact["teach"]:
            turn = teach.ask(text)
            drifts += [c["drift"] for c in turn.update.consolidated if c["drift"] is not None]
            seconds += [round(c["seconds"], 1) for c in turn.update.consolidated]
            questions += [q for c in turn.update.consolidated for q, _ in c["examples"]]
        path = Path(tempfile.mkdtemp()) / "memory.safetensors"
        teach.save_memory(path)
        teach.close()
        ask = new_engine(backend, args.module, options, max_tokens=24, seed=0, learning=False)  # type: ignore[arg-type]
        ask.load_memory(path)
        answer = ask.respond([{"role": "user", "content": fact["query"]}]).assistant
        hit = recalls(answer, fact["expect"])
        opened = ask.module.summary().get("facts_open")  # the facts the question read (modules with fact gates)
        prompts = [unrelated[(k * UNRELATED_PER_FACT + j) % len(unrelated)] for j in range(UNRELATED_PER_FACT)]
        kept = sum(ask.respond([{"role": "user", "content": q}]).assistant == reference[q] for q in prompts)
        ask.close()
        recalled += hit
        same += kept
        print(json.dumps({"name": fact["name"], "answer": answer, "recalled": hit, "unrelated_identical": kept,
                          "drift": max(drifts) if drifts else None, "seconds": seconds, "questions": questions,
                          **({"opened": opened} if opened is not None else {})}), flush=True)
    print(f"recall {recalled}/{len(facts)}, unrelated identical {same}/{len(facts) * UNRELATED_PER_FACT}")


def crowded(backend: Any, module: str, options: dict[str, Any], consolidation: dict[str, Any],
            facts: list[dict[str, Any]], reference: dict[str, str]) -> None:
    """Every fact into one memory, then each question and every unrelated prompt after a reload."""
    teach = new_engine(backend, module, options, max_tokens=12, seed=0, consolidate=True,
                       consolidation_options=consolidation)
    undone = 0
    own: dict[str, list[int]] = {}  # the fact chapters each fact's statements opened
    learned: dict[str, list[str]] = {}
    for fact in facts:
        before = teach.module.summary().get("facts", 0)
        for text in fact["teach"]:
            consolidated = teach.ask(text).update.consolidated
            undone += sum(c["rolled_back"] for c in consolidated)
            learned.setdefault(fact["name"], []).extend(q for c in consolidated for q, _ in c["examples"])
        own[fact["name"]] = list(range(before, teach.module.summary().get("facts", 0)))
    path = Path(tempfile.mkdtemp()) / "memory.safetensors"
    teach.save_memory(path)
    teach.close()
    ask = new_engine(backend, module, options, max_tokens=24, seed=0, learning=False)
    ask.load_memory(path)
    recalled = 0
    for fact in facts:
        answer = ask.respond([{"role": "user", "content": fact["query"]}]).assistant
        hit = recalls(answer, fact["expect"])
        recalled += hit
        print(json.dumps({"name": fact["name"], "answer": answer, "recalled": hit,
                          "opened": ask.module.summary().get("facts_open"), "own": own[fact["name"]],
                          "questions": learned[fact["name"]]}), flush=True)
    same = 0
    for prompt, plain in reference.items():
        answer = ask.respond([{"role": "user", "content": prompt}]).assistant
        same += answer == plain
        if answer != plain:
            print(json.dumps({"changed": prompt, "answer": answer, "plain": plain,
                              "opened": ask.module.summary().get("facts_open")}), flush=True)
    ask.close()
    print(f"crowded: recall {recalled}/{len(facts)}, unrelated identical {same}/{len(reference)}, undone {undone}")


if __name__ == "__main__":
    main()
