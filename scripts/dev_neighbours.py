"""Neighbouring questions: does `trace_bank` read a statement for a question about something next to it?

Each fact of `--facts` is written into a memory of its own (alone) and all into one memory (crowded);
its question should read its statement, and its neighbour from `--neighbours` (a question about
another slot of the same kind, never told: "What is my sister's name?" after "My younger brother is
called Kenji.") should read nothing. Routing decisions only (no reply), with `cover_surprisal` off (the
default) and at `--cover` nats, in one run.

    python scripts/dev_neighbours.py [--facts F] [--neighbours F] [--cover 6.5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmm.bench.engines import load_shared_backend, new_engine
from lmm.bench.metrics import recalls


def read(module: Any, text: str) -> list[str]:
    return [module._text(module.traces[i]) for i in module.select(text)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=Path, default=Path("benchmarks/dev/facts.jsonl"))
    p.add_argument("--neighbours", type=Path, default=Path("benchmarks/dev/neighbours.jsonl"))
    p.add_argument("--cover", type=float, default=6.5, help="cover_surprisal of the second rule (nats)")
    args = p.parse_args()
    facts = {f["name"]: f for f in map(json.loads, args.facts.read_text().splitlines())}
    pairs = [(facts[n["fact"]], n["query"]) for n in map(json.loads, args.neighbours.read_text().splitlines())]
    backend = load_shared_backend("torch", None, 1)
    rules = {"off (default)": 0.0, f"cover_surprisal {args.cover}": args.cover}
    tally: dict[tuple[str, str], list[int]] = {}

    def count(mode: str, rule: str, module: Any, fact: dict[str, Any], neighbour: str) -> None:
        module.cfg.cover_surprisal = rules[rule]
        right = any(recalls(t, fact["expect"]) for t in read(module, fact["query"]))
        wrong = read(module, neighbour)
        row = tally.setdefault((mode, rule), [0, 0, 0])
        row[0] += right
        row[1] += bool(wrong)
        row[2] += 1
        if wrong and rules[rule] > 0:
            print(f"  {mode}: {neighbour!r} reads {wrong[0]!r}", flush=True)

    crowded = new_engine(backend, "trace_bank", {}, max_tokens=8, seed=0)
    for fact, _ in pairs:
        for text in fact["teach"]:
            crowded.module.write([{"role": "user", "content": text}], 0)
    for fact, neighbour in pairs:
        alone = new_engine(backend, "trace_bank", {}, max_tokens=8, seed=0)
        for text in fact["teach"]:
            alone.module.write([{"role": "user", "content": text}], 0)
        for rule in rules:
            count("alone", rule, alone.module, fact, neighbour)
            count("crowded", rule, crowded.module, fact, neighbour)
        alone.close()
    print("| memory | rule | question reads its statement | neighbour reads something |")
    print("| --- | --- | --- | --- |")
    for (mode, rule), (right, wrong, n) in tally.items():
        print(f"| {mode} | {rule} | {right}/{n} | {wrong}/{n} |")


if __name__ == "__main__":
    main()
