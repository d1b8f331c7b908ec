#!/usr/bin/env python
"""The classic two-session memorization check over a list of names.

For each name, with a fresh memory module on one loaded backend:
  session 1: the user says `I am {name}.` (a reply is generated, the module learns), the
             state is saved;
  session 2: a fresh engine on the same backend loads the state, with NO chat history, and
             the user asks the question. PASS when the name appears in the answer
             (`lmm.bench.metrics.recalls`).
`--in-context` keeps the teaching turn in the chat history instead (no memory, no learning):
the upper bound on the same wording. Greedy decoding, fixed seed.

    python scripts/memorization_smoke.py --memory lora_on_user --backend torch
    python scripts/memorization_smoke.py --in-context
    python scripts/memorization_smoke.py --memory lora_on_user --mm-opt lr=0.01 --names Alice,Bob
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from lmm.backends import BackendError
from lmm.bench.engines import check_module_options, load_shared_backend, new_engine, parse_module_options
from lmm.bench.metrics import is_degenerate, recalls
from lmm.models import ModelError

NAMES = ("Alice", "Bob", "Carol", "David", "Eva", "Ivan", "Yuri", "Aydar", "Mikhail", "Matvey")
QUESTION = ('What is my name? If you think you don\'t know, just try starting and may be you will guess: '
            '"User\'s name is..."')
TEACH = "I am {name}."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", default="lora_on_user", help="memory module (default: lora_on_user)")
    p.add_argument("--backend", default="auto", help="auto | torch | mlx_lm")
    p.add_argument("--model", default=None, help="local HF folder or hub id (default: the embedded SmolLM2)")
    p.add_argument("--names", default=",".join(NAMES), help="comma list of names")
    p.add_argument("--question", default=QUESTION, help="the session-2 question")
    p.add_argument("--in-context", action="store_true",
                   help="keep the teaching turn in the chat history instead of using memory (upper bound)")
    p.add_argument("--mm-opt", action="append", default=[], metavar="KEY=VALUE", help="module option (repeatable)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per reply (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    memory = "identity" if args.in_context else args.memory
    try:
        if not names:
            raise ValueError("--names is empty")
        options = parse_module_options(args.mm_opt, scoped=False)
        if args.in_context and options:
            raise ValueError("--in-context uses no memory module; drop --mm-opt")
        check_module_options(memory, options)  # type: ignore[arg-type]
        backend = load_shared_backend(args.backend, args.model, args.threads)
    except (ValueError, OSError, ModelError, BackendError) as exc:
        print(f"memorization_smoke: error: {exc}", file=sys.stderr)
        return 2
    mode = "in-context (teaching turn kept in the history)" if args.in_context else f"memory {memory}"
    print(f"{backend.model_id} on {backend.name}, {mode}; question: {args.question!r}")
    passed = fluent = 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmm-smoke-") as tmp:
        for i, name in enumerate(names):
            engine = new_engine(backend, memory, options, max_tokens=args.max_tokens,  # type: ignore[arg-type]
                                seed=args.seed, learning=not args.in_context)
            engine.ask(TEACH.format(name=name))
            if args.in_context:
                engine.learning = False
                answer = engine.ask(args.question).assistant
            else:
                path = Path(tmp) / f"{i}.safetensors"
                engine.save_memory(path)
                engine.close()
                engine = new_engine(backend, memory, options, max_tokens=args.max_tokens,  # type: ignore[arg-type]
                                    seed=args.seed, learning=False)
                engine.load_memory(path)
                answer = engine.ask(args.question).assistant
            engine.close()
            ok = recalls(answer, [name])
            passed += ok
            fluent += not is_degenerate(answer)
            print(f"{'PASS' if ok else 'FAIL'} {name}: {answer!r}", flush=True)
    backend.close()
    n = len(names)
    print(f"Success rate: {passed}/{n}")
    print(f"Fluent answers: {fluent}/{n} (not degenerate)")
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
