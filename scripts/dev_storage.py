"""Reproduce docs/trace_bank.md's storage table: routing decisions and bytes per fact for each `dtype`.

Every statement of the development facts is written into one `trace_bank` memory per storage form
(the same writes: float32 is the reference); then each dev question and each dev unrelated prompt
is routed (`select`, both stages) and the traces chosen are compared with float32's. Prints one line
per form: decisions equal to float32's, right trace chosen for the questions, unrelated prompts that
read anything, and the saved file's bytes per stored statement.

    python scripts/dev_storage.py [--dtypes float32,int8,int4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lmm.bench.engines import load_shared_backend, new_engine
from lmm.bench.scenarios import load_probes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,int8,int4")
    p.add_argument("--facts", type=Path, default=Path("benchmarks/dev/facts.jsonl"))
    p.add_argument("--unrelated", type=Path, default=Path("benchmarks/dev/unrelated.jsonl"))
    args = p.parse_args()
    facts = [json.loads(line) for line in args.facts.read_text().splitlines() if line.strip()]
    unrelated = load_probes(args.unrelated)
    backend = load_shared_backend("torch", None, threads=1)
    root = Path(tempfile.mkdtemp(prefix="lmm-dev-storage-"))
    reference: list[tuple[str, ...]] | None = None
    for dtype in args.dtypes.split(","):
        eng = new_engine(backend, "trace_bank", {"dtype": dtype}, max_tokens=8, seed=0, learning=False)
        try:
            written: dict[str, int] = {}  # fact name -> `written` of its first trace
            for fact in facts:
                before = len(eng.module.traces)
                for text in fact["teach"]:
                    eng.module.write([{"role": "user", "content": text}], 0)
                if len(eng.module.traces) > before:
                    written[fact["name"]] = eng.module.traces[before].written
            size = eng.save_memory(root / f"{dtype}.safetensors").stat().st_size
            decisions, right, leaks = [], 0, 0
            for fact in facts:
                chosen = tuple(eng.module._text(eng.module.traces[i]) for i in eng.module.select(fact["query"]))
                decisions.append(chosen)
                want = written.get(fact["name"])
                right += any(eng.module.traces[i].written == want for i in eng.module.select(fact["query"]))
            for prompt in unrelated:
                chosen = tuple(eng.module._text(eng.module.traces[i]) for i in eng.module.select(prompt))
                decisions.append(chosen)
                leaks += bool(chosen)
        finally:
            eng.close()
        reference = reference or decisions
        same = sum(a == b for a, b in zip(decisions, reference, strict=True))
        print(f"{dtype:<8} same decisions as {args.dtypes.split(',')[0]}: {same}/{len(decisions)} · right trace read: "
              f"{right}/{len(facts)} · unrelated prompts that read a trace: {leaks}/{len(unrelated)} · "
              f"{size / max(len(eng.module.traces), 1):,.0f} bytes per stored statement "
              f"({len(eng.module.traces)} traces)", flush=True)


if __name__ == "__main__":
    main()
