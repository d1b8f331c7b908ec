"""What a trace write, a message's routing and a short reply cost on the embedded model, with and
without the fixes of issue #13: numpy's BLAS pool limited to one thread, the system prompt's frozen
state, and the llama family run by lmm's own torch file instead of transformers'.

Writes `--facts` facts of the scale generator into one `trace_bank` memory, then alternates the
variants write by write and message by message in ONE run (on a shared machine only figures from
one run compare): per variant, the median trace write, message encoding (the first stage's input)
and routing (both stages, states not cached), and a greedy reply of up to 12 tokens to the message
(no memory read). Variants: `fixed` (the default), `no-prefix` (every forward from the first
token), `transformers` (the same folder through transformers' model, the rest unchanged), and,
with `--numpy-pool`, `numpy-pool` (numpy's BLAS back to one
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

    from lmm.backends.base import DecodingConfig
    from lmm.bench.engines import load_shared_backend, new_engine
    from lmm.bench.scale import UNRELATED, generate_facts

    backend = load_shared_backend("torch", None, args.threads)
    runtimes = {True: _model_state(backend), False: _transformers_state(backend)}
    engine = new_engine(backend, "trace_bank", {}, max_tokens=8, seed=0)
    module: Any = engine.module
    facts = generate_facts(args.facts + 40)
    for fact in facts[:40]:  # the memory is not empty, and the system prompt's state exists
        module.write([{"role": "user", "content": fact.statement}], 0)
    runtimes[True]["_prefix"] = backend._prefix
    variants: dict[str, Callable[[], None]] = {
        "fixed": lambda: backend.__dict__.update(runtimes[True]),
        "no-prefix": lambda: backend.__dict__.update({**runtimes[True], "_prefix": False}),
        "transformers": lambda: backend.__dict__.update(runtimes[False]),
    }
    reply = DecodingConfig(strategy="greedy", max_tokens=12)
    figures: dict[str, dict[str, list[float]]] = {}

    def keep_prefix(name: str) -> None:
        if name == "transformers":  # its system prompt's state, computed on first use, is kept
            runtimes[False]["_prefix"] = backend._prefix

    def measure(names: list[str], new_facts: list[Any], messages: list[str]) -> None:
        for k, fact in enumerate(new_facts):
            name = names[k % len(names)]
            variants[name]()
            t0 = time.perf_counter()
            module.write([{"role": "user", "content": fact.statement}], 0)
            figures.setdefault(name, {}).setdefault("write", []).append(time.perf_counter() - t0)
            keep_prefix(name)
        for k, message in enumerate(messages):  # every message under every variant, first one rotating
            for name in names[k % len(names):] + names[: k % len(names)]:
                variants[name]()
                module._queries.clear()
                module._logprobs.clear()
                t0 = time.perf_counter()
                module._query_states(message)
                t1 = time.perf_counter()
                module._queries.clear()
                module._logprobs.clear()
                module.route(message)
                t2 = time.perf_counter()
                backend.reset_session()
                prompt = backend.formatter.generation_ids([{"role": "user", "content": message}])
                list(backend.generate(prompt, reply))
                figures[name].setdefault("encode", []).append(t1 - t0)
                figures[name].setdefault("route", []).append(t2 - t1)
                figures[name].setdefault("reply", []).append(time.perf_counter() - t2)
                keep_prefix(name)

    questions = [f.question for f in facts[:40]] + list(UNRELATED) * 2
    measure(["fixed", "no-prefix", "transformers"], facts[40: 40 + args.facts], questions)
    if args.numpy_pool:
        from threadpoolctl import threadpool_limits

        threadpool_limits(os.cpu_count() or 1, user_api="blas")  # numpy's pool back to one thread per core
        variants["numpy-pool"] = variants["fixed"]
        variants["fixed"]()
        measure(["numpy-pool"], facts[40: 40 + args.facts // 2], questions)
    engine.close()
    print(f"{args.facts} writes alternated, {len(questions)} messages routed and replied to under each; torch threads "
          f"{args.threads or 'default'}; medians in ms")
    print(f"{'variant':<12} {'write':>7} {'encode':>7} {'route':>7} {'reply':>7}")
    for name, values in figures.items():
        print(f"{name:<12} {median_ms(values['write']):>7} {median_ms(values['encode']):>7} "
              f"{median_ms(values['route']):>7} {median_ms(values['reply']):>7}")


_SWAPPED = ("model", "native", "layers", "layer_path", "_cache_kw", "_prefix")


def _model_state(backend: Any) -> dict[str, Any]:
    return {name: getattr(backend, name) for name in _SWAPPED}


def _transformers_state(backend: Any) -> dict[str, Any]:
    """The backend's attributes that name its model, for the same folder loaded through transformers."""
    from lmm.backends.torch_backend import TorchBackend

    other = TorchBackend(backend.model_path, backend.model_id, dtype="float32", runtime="transformers")
    return {**_model_state(other), "_prefix": None}


if __name__ == "__main__":
    main()
