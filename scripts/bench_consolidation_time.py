"""Consolidation time per statement on the embedded model (issue #14's 10 s goal), per module.

For each module, one engine with `--consolidate` gets a warm-up message (the write gate, the guard
replies and the gate's reference states are computed once per loaded model), then dev statements
9-16 one after another; each statement's consolidation record gives its seconds. Prints a line per
module: median, max and every statement's time. `--teacher` times the teacher's part alone (the
questions and answers of dev statements 1-16, no module). Run it alone on the machine: the figures are
wall times.

    python scripts/bench_consolidation_time.py [--modules lora_on_user,chaptered_bank] [--threads 2] [--teacher]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from lmm.bench.engines import load_shared_backend, new_engine
from lmm.consolidation import Consolidator

GRADIENT = ("lora_on_user", "hash_gradient", "recurrent_state", "chaptered_bank")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modules", default=",".join(GRADIENT))
    p.add_argument("--facts", type=Path, default=Path("benchmarks/dev/facts.jsonl"))
    p.add_argument("--backend", default="torch")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the chat's default is 2 here)")
    p.add_argument("--teacher", action="store_true", help="time the teacher's questions and answers alone")
    args = p.parse_args()
    facts = [json.loads(line) for line in args.facts.read_text().splitlines() if line.strip()]
    backend = load_shared_backend(args.backend, None, threads=args.threads)
    if args.teacher:
        teacher = Consolidator(backend)
        teacher.examples("The kettle in the staff room is blue.")  # warm-up
        seconds = []
        for fact in facts[:16]:
            start = time.perf_counter()
            teacher.examples(fact["teach"][0])
            seconds.append(round(time.perf_counter() - start, 2))
        print(f"teacher: median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s, per statement {seconds}")
        return
    facts = facts[8:16]
    for module in args.modules.split(","):
        engine = new_engine(backend, module, {}, max_tokens=12, seed=0, consolidate=True)
        engine.ask("Hello there, I'm Bartholomew.")
        seconds = [round(c["seconds"], 1) for fact in facts
                   for c in engine.ask(fact["teach"][0]).update.consolidated]
        engine.close()
        print(f"{module}: median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s, "
              f"per statement {seconds}", flush=True)


if __name__ == "__main__":
    main()
