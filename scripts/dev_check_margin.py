"""Choose `trace_bank`'s `check_margin` on the development set: which first-stage candidates are worth
the second stage's forward pass.

The dev facts are written into one memory (crowded) and each into a memory of its own (alone); every
dev question (and the dev unrelated prompts, against every 4th lone fact) is routed with the second
stage checking all `candidates` (check_margin -2), and the first-stage margin of every trace that
gets read is recorded. Then for each floor: how many routing decisions differ from checking all, how
many read the right trace, how many unrelated prompts read anything, and how many candidates the
second stage still checks.

    python scripts/dev_check_margin.py [--floors -2,-0.3,-0.2,-0.1,-0.05,0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from lmm.bench.engines import load_shared_backend, new_engine
from lmm.bench.scenarios import load_probes


def decide(module: Any, text: str, floor: float) -> tuple[tuple[int, ...], int, list[float]]:
    """(traces read, candidates checked, margins of the traces read) for `text` at `floor`."""
    module.cfg.check_margin = floor
    margins = module.margins(text)
    chosen, relevance = module.route(text)
    return tuple(int(module.traces.written[i]) for i in chosen), len(relevance), [float(margins[i]) for i in chosen]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--floors", default="-2,-0.3,-0.2,-0.1,-0.05,0")
    p.add_argument("--facts", type=Path, default=Path("benchmarks/dev/facts.jsonl"))
    p.add_argument("--unrelated", type=Path, default=Path("benchmarks/dev/unrelated.jsonl"))
    args = p.parse_args()
    floors = [float(x) for x in args.floors.split(",")]
    facts = [json.loads(line) for line in args.facts.read_text().splitlines() if line.strip()]
    unrelated = load_probes(args.unrelated)
    backend = load_shared_backend("torch", None, threads=1)

    def memory(taught: list[dict[str, Any]]) -> tuple[Any, dict[str, int]]:
        eng = new_engine(backend, "trace_bank", {}, max_tokens=8, seed=0, learning=False)
        written = {}
        for fact in taught:
            before = len(eng.module.traces)
            for text in fact["teach"]:
                eng.module.write([{"role": "user", "content": text}], 0)
            if len(eng.module.traces) > before:
                written[fact["name"]] = int(eng.module.traces.written[before])
        return eng, written

    # rows[floor] = list of (setting, kind, decision, checked, right)
    rows: dict[float, list[tuple[str, str, tuple[int, ...], int, bool]]] = {f: [] for f in floors}
    read_margins: list[float] = []

    def measure(setting: str, eng: Any, written: dict[str, int], asked: list[dict[str, Any]],
                with_unrelated: bool = True) -> None:
        messages = [("question", f["query"], written.get(f["name"])) for f in asked]
        messages += [("unrelated", u, None) for u in unrelated] if with_unrelated else []
        for kind, text, want in messages:
            for floor in floors:
                chosen, checked, margins = decide(eng.module, text, floor)
                rows[floor].append((setting, kind, chosen, checked, want is not None and want in chosen))
                if floor == floors[0]:
                    read_margins.extend(margins)

    eng, written = memory(facts)
    measure("crowded", eng, written, facts)
    eng.close()
    for k, fact in enumerate(facts):  # the unrelated prompts against every 4th lone fact (time)
        eng, written = memory([fact])
        measure("alone", eng, written, [fact], with_unrelated=k % 4 == 0)
        eng.close()

    margins = np.asarray(read_margins)
    print(f"first-stage margins of the traces read with every candidate checked ({len(margins)}): min "
          f"{margins.min():.3f}, 5th percentile {np.percentile(margins, 5):.3f}, median {np.median(margins):.3f}")
    reference = rows[floors[0]]
    print("| check_margin | decisions as with all checked | right trace read (crowded / alone) | unrelated reading "
          "(crowded / alone) | candidates checked per message |")
    print("| --- | --- | --- | --- | --- |")
    for floor in floors:
        got = rows[floor]
        same = sum(a[2] == b[2] for a, b in zip(got, reference, strict=True))

        def count(setting: str, kind: str, what: str, got: list = got) -> int:
            return sum(bool(r[4] if what == "right" else r[2]) for r in got if r[0] == setting and r[1] == kind)

        checked = np.mean([r[3] for r in got])
        print(f"| {floor:g} | {same}/{len(got)} | {count('crowded', 'question', 'right')} / "
              f"{count('alone', 'question', 'right')} of {len(facts)} | {count('crowded', 'unrelated', 'read')} / "
              f"{count('alone', 'unrelated', 'read')} of {len(unrelated)} x (1 / {len(facts[::4])} memories) "
              f"| {checked:.2f} |", flush=True)


if __name__ == "__main__":
    main()
