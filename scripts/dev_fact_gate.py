"""Measure the fact gates alone on the development set: which messages open which statement's gate.

Every statement of the dev facts gets a gate in ONE module (the teacher's questions, no training: the
gate depends on the frozen model only), then each fact's question, the dev unrelated prompts and
probes, and the neighbour questions (about something near a fact that was never said) are routed.
Prints: questions that open their own fact's gate, questions whose nearest open gate is their own
(what a crowded memory reads), and messages that open any gate. A gate's route and threshold are the
same in every gated module; `--mm-opt` changes them (`fact_map=false`, `fact_margin=0.1`, ...).

    python scripts/dev_fact_gate.py --mm-opt fact_map=false
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmm.bench.engines import load_shared_backend, new_engine, parse_module_options
from lmm.consolidation import GUARD_PROMPTS, GUARD_TRAIN, Consolidator


def rows(path: Path, key: str) -> list[Any]:
    return [json.loads(line)[key] for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--module", default="lora_on_user")
    p.add_argument("--dev", type=Path, default=Path("benchmarks/dev"))
    p.add_argument("--mm-opt", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    facts = [json.loads(line) for line in (args.dev / "facts.jsonl").read_text().splitlines() if line.strip()]
    backend = load_shared_backend("torch", None, threads=0)
    engine = new_engine(backend, args.module, parse_module_options(args.mm_opt, scoped=False),  # type: ignore[arg-type]
                        max_tokens=12, seed=0, consolidate=True)
    module, consolidator = engine.module, Consolidator(backend)
    if not hasattr(module, "passed"):
        raise SystemExit(f"{args.module} has no fact gates")
    owner: list[int] = []  # the fact of each gate
    for k, fact in enumerate(facts):
        for text in fact["teach"]:
            for statement in consolidator.statements(text, engine.layer):
                examples, _ = consolidator.examples(statement)
                if examples:
                    with module.consolidating([e.question for e in examples], GUARD_PROMPTS[:GUARD_TRAIN],
                                              statement=statement):
                        owner.append(k)
    own = first = 0
    for k, fact in enumerate(facts):
        passed = module.passed(fact["query"])
        own += any(owner[i] == k for i in passed)
        first += bool(passed) and owner[passed[0]] == k
        print(json.dumps({"query": fact["query"], "opened_own": any(owner[i] == k for i in passed),
                          "nearest_open": [facts[owner[i]]["name"] for i in passed[:2]]}))
    report = [f"gates {len(owner)} for {len(facts)} facts", f"own question opens its gate {own}/{len(facts)}",
              f"own gate nearest {first}/{len(facts)}"]
    for name, key in (("unrelated", "prompt"), ("probes", "prompt"), ("neighbours", "query")):
        if not (args.dev / f"{name}.jsonl").exists():
            continue
        texts = rows(args.dev / f"{name}.jsonl", key)
        report.append(f"{name} opening a gate {sum(bool(module.passed(t)) for t in texts)}/{len(texts)}")
    engine.close()
    print("; ".join(report))


if __name__ == "__main__":
    main()
