"""How `trace_bank` resolves corrections on the development pairs (`benchmarks/dev/supersede.jsonl`).

Each pair is an older and a newer statement, said in two messages, and a question about the older
one's subject; `same` says whether the newer corrects the older or is a different fact of the same
shape. Per rule, the table counts what a reply to the question reads: for a correction, only the
newer is right; for a different fact, the older must still be read. The rules are module options,
so the figures of `docs/trace_bank.md` ("Corrections") come from:

    python scripts/dev_corrections.py                                  # per message (the default)
    python scripts/dev_corrections.py supersede=1 supersede_sentence=1 # no correction at all
    python scripts/dev_corrections.py supersede_on_write=true supersede=0.55 supersede_sentence=0.72 dedupe=0.9
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from lmm.bench.engines import load_shared_backend, new_engine

PAIRS = Path(__file__).resolve().parent.parent / "benchmarks" / "dev" / "supersede.jsonl"


def main() -> None:
    options = dict(arg.split("=", 1) for arg in sys.argv[1:])
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    backend = load_shared_backend("torch", None, threads=1)
    counts: Counter[tuple[bool, str]] = Counter()
    for row in rows:
        engine = new_engine(backend, "trace_bank", {"write_gate": "all", **options}, max_tokens=8, seed=0)
        module = engine.module
        for text in (row["older"], row["newer"]):  # two messages
            module.write([{"role": "user", "content": text}], 0)
        read = [module._text(module.traces[i]) for i in module.select(row["query"])]
        older, newer = row["older"] in read, row["newer"] in read
        counts[(row["same"], "both" if older and newer else "older only" if older else
                "newer only" if newer else "nothing")] += 1
        engine.close()
    for same, label in (True, "corrections"), (False, "different facts"):
        total = sum(v for (s, _), v in counts.items() if s == same)
        cells = ", ".join(f"{what} {counts[(same, what)]}" for what in ("newer only", "both", "older only", "nothing"))
        print(f"{label} ({total}): {cells}")


if __name__ == "__main__":
    main()
