"""What a trace write and a message's routing cost on the embedded model, with and without the two
fixes of issue #13: numpy's BLAS pool limited to one thread, and the system prompt's frozen state.

Writes `--facts` facts of the scale generator into one `trace_bank` memory, then alternates the
variants write by write and message by message in ONE run (on a shared machine only figures from
one run compare): per variant, the median trace write, message encoding (the first stage's input)
and routing (both stages, states not cached). Variants: `fixed` (the default), `no-prefix` (every
forward from the first token), and, with `--numpy-pool`, `numpy-pool` (numpy's BLAS back to one
thread per core, as before the fix; it cannot be undone per call, so it runs last, alone).

Usage: python scripts/bench_forward_costs.py [--facts 220] [--threads 0] [--numpy-pool]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def median_ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.0f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=220)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's, one per core)")
    parser.add_argument("--numpy-pool", action="store_true", help="also numpy's BLAS with one thread per core")
    args = parser.parse_args()

    from lmm.bench.engines import load_shared_backend, new_engine
    from lmm.bench.scale import UNRELATED, generate_facts

    backend = load_shared_backend("torch", None, args.threads)
    engine = new_engine(backend, "trace_bank", {}, max_tokens=8, seed=0)
    module: Any = engine.module
    facts = generate_facts(args.facts + 40)
    for fact in facts[:40]:  # the memory is not empty, and the system prompt's state exists
        module.write([{"role": "user", "content": fact.statement}], 0)
    prefix = backend._prefix
    variants: dict[str, Callable[[], None]] = {
        "fixed": lambda: setattr(backend, "_prefix", prefix),
        "no-prefix": lambda: setattr(backend, "_prefix", False),
    }
    figures: dict[str, dict[str, list[float]]] = {}

    def measure(names: list[str], new_facts: list[Any], messages: list[str]) -> None:
        for k, fact in enumerate(new_facts):
            name = names[k % len(names)]
            variants[name]()
            t0 = time.perf_counter()
            module.write([{"role": "user", "content": fact.statement}], 0)
            figures.setdefault(name, {}).setdefault("write", []).append(time.perf_counter() - t0)
        for k, message in enumerate(messages):
            name = names[k % len(names)]
            variants[name]()
            module._queries.clear()
            module._logprobs.clear()
            t0 = time.perf_counter()
            module._query_states(message)
            t1 = time.perf_counter()
            module._queries.clear()
            module._logprobs.clear()
            module.route(message)
            figures[name].setdefault("encode", []).append(t1 - t0)
            figures[name].setdefault("route", []).append(time.perf_counter() - t1)

    questions = [f.question for f in facts[:40]] + list(UNRELATED) * 2
    measure(["fixed", "no-prefix"], facts[40: 40 + args.facts], questions * 2)
    if args.numpy_pool:
        from threadpoolctl import threadpool_limits

        threadpool_limits(os.cpu_count() or 1, user_api="blas")  # numpy's pool back to one thread per core
        variants["numpy-pool"] = variants["fixed"]
        measure(["numpy-pool"], facts[40: 40 + args.facts // 2], questions)
    engine.close()
    print(f"{args.facts} writes and {2 * len(questions)} routed messages alternated; torch threads "
          f"{args.threads or 'default'}; medians in ms")
    print(f"{'variant':<12} {'write':>7} {'encode':>7} {'route':>7}")
    for name, values in figures.items():
        print(f"{name:<12} {median_ms(values['write']):>7} {median_ms(values['encode']):>7} "
              f"{median_ms(values['route']):>7}")


if __name__ == "__main__":
    main()
