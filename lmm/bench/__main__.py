"""`python -m lmm.bench`: run the memory benchmark and print one table.

    python -m lmm.bench --backend torch                       # every registered module, facts.jsonl
    python -m lmm.bench --modules lora_on_user --limit 4      # a quick run
    python -m lmm.bench --mm-opt lora_on_user.lr=0.01 --mm-opt hash_gradient.bits=12
    python -m lmm.bench --lifelong --sessions 5               # lifelong.jsonl into one memory
    python -m lmm.bench --abilities                           # benchmarks/abilities/*.jsonl
    python -m lmm.bench --locomo conv-26.json --speaker a     # a LoCoMo conversation, speaker a as user
    python -m lmm.bench --scale 10,100,1000                   # synthetic facts into one growing memory

Writes `<out>/bench_<backend>_<timestamp>.json` (every answer), `latest_<backend>.json` and
a PNG chart beside them (lifelong: `lifelong_<backend>_…`, `latest_lifelong_<backend>.*`).
The protocol is described in `lmm.bench.runner`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmm.backends import BackendError
from lmm.backends.decoding import DecodingConfig
from lmm.bench.engines import parse_module_options
from lmm.bench.runner import DEFAULT_ANSWER_TOKENS, DEFAULT_REPLY_TOKENS, BenchConfig
from lmm.consolidation import ConsolidationConfig
from lmm.models import ModelError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lmm.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", help="auto | torch | mlx_lm (default: auto)")
    p.add_argument("--model", default=None, help="local HF folder or hub id (default: the embedded SmolLM2)")
    p.add_argument("--modules", default=None,
                   help="comma list of memory modules (default: every registered one); "
                        "identity is the `none` reference row")
    p.add_argument("--scenarios", type=Path, default=None,
                   help="scenario JSONL (default: benchmarks/facts.jsonl; --lifelong: benchmarks/lifelong.jsonl)")
    p.add_argument("--probes", type=Path, default=Path("benchmarks/probes.jsonl"), help="locality probes JSONL")
    p.add_argument("--distractors", type=Path, default=Path("benchmarks/distractors.jsonl"),
                   help="distractor pool JSONL")
    p.add_argument("--limit", type=int, default=None, help="run only the first N scenarios")
    p.add_argument("--mm-opt", action="append", default=[], metavar="MODULE.KEY=VALUE",
                   help="module option (repeatable)")
    p.add_argument("--consolidate-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="consolidation option for the <module>+consolidate rows (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: artifacts/bench)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_ANSWER_TOKENS,
                   help=f"tokens for answers to queries and probes (default {DEFAULT_ANSWER_TOKENS})")
    p.add_argument("--reply-tokens", type=int, default=DEFAULT_REPLY_TOKENS,
                   help=f"tokens for replies to teaching/distractor messages (default {DEFAULT_REPLY_TOKENS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", type=int, default=None, help="hooked decoder layer (default: the middle one)")
    p.add_argument("--no-references", action="store_true", help="skip the `none` and `in-context` rows")
    p.add_argument("--lifelong", action="store_true", help="teach every scenario into ONE memory over sessions")
    p.add_argument("--sessions", type=int, default=5, help="--lifelong: number of sessions (default 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per process (default 1; 0: torch's default, one per core)")
    p.add_argument("--jobs", type=int, default=0,
                   help="recall and lifelong runs: rows run in this many worker processes, each loading the "
                        "model (default 0: one per core; 1: one process, the rows one after another)")
    p.add_argument("--repetition-penalty", type=float, default=1.1,
                   help="decoding's repetition penalty over the reply (default 1.1, the chat's; 1: off)")
    p.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                   help="decoding never repeats an n-gram of N tokens of the reply (default 0: off)")
    p.add_argument("--memory-contrast", type=float, default=DecodingConfig.memory_contrast, metavar="F",
                   help=f"decoding's memory contrast while a memory is read (default {DecodingConfig.memory_contrast}, "
                        "the chat's; 0: off)")
    p.add_argument("--abilities", type=Path, nargs="?", const=Path("benchmarks/abilities"), default=None,
                   metavar="DIR", help="the ability benchmark on DIR/<ability>.jsonl (default folder: "
                                       "benchmarks/abilities); rows: none, the modules (default trace_bank), "
                                       "in-context, oracle")
    p.add_argument("--locomo", type=Path, default=None, metavar="FILE",
                   help="a LoCoMo conversation (JSON): one speaker's turns taught session by session, "
                        "single-hop questions about them asked in the first person, and the unrelated "
                        "prompts of the --abilities folder asked with the conversation in memory")
    p.add_argument("--speaker", default="a", choices=["a", "b"], help="--locomo: which speaker is the user")
    p.add_argument("--scale", default=None, metavar="N,N,...",
                   help="write N synthetic facts into one memory of the module (default trace_bank) and ask a "
                        "sample at each N: recall, locality, write and routing time, bytes per fact, load time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _modules(args: argparse.Namespace, default: list[str] | None) -> list[str] | None:
    return [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else default


def _progress(args: argparse.Namespace) -> tuple[Callable[[str], None], Callable[[], None]]:
    """A one-line progress printer on stderr (silent with --no-progress), and its end."""
    done = [0]

    def advance(desc: str) -> None:
        done[0] += 1
        if not args.no_progress:
            print(f"\r[{done[0]}] {desc[:70]:<70}", end="", file=sys.stderr, flush=True)

    def finish() -> None:
        if not args.no_progress:
            print(file=sys.stderr)

    return advance, finish


def _save_json(args: argparse.Namespace, kind: str, backend: str, results: dict[str, Any]) -> Path:
    """`<out>/<kind>_<backend>_<time>.json`, in the recall benchmark's output folder."""
    out = BenchConfig(out=args.out).out_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}_{backend}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def run_scale_cli(args: argparse.Namespace) -> int:
    """--scale: one growing memory; prints the table, writes JSON and a PNG."""
    from lmm.bench.engines import check_module_options, load_shared_backend
    from lmm.bench.scale import format_scale, plot_scale, run_scale

    try:
        sizes = [int(x) for x in args.scale.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--scale expects comma-separated counts, got {args.scale!r}") from None
    module = _modules(args, ["trace_bank"])[0]  # type: ignore[index]
    options = parse_module_options(args.mm_opt, scoped=True).get(module, {})  # type: ignore[union-attr]
    check_module_options(module, options)  # type: ignore[arg-type]
    backend = load_shared_backend(args.backend, args.model, threads=args.threads)
    advance, finish = _progress(args)
    start = time.perf_counter()
    states = BenchConfig(out=args.out).out_dir() / f"scale_states_{time.strftime('%Y%m%d_%H%M%S')}"
    results = run_scale(backend, module, options, sizes, answer_tokens=args.max_tokens,  # type: ignore[arg-type]
                        seed=args.seed, advance=advance, states=states)
    finish()
    results.update(command=" ".join(sys.argv), backend=backend.name, model_id=backend.model_id,
                   wall_seconds=time.perf_counter() - start)
    path = _save_json(args, "scale", backend.name, results)
    plot_scale(results, path.with_suffix(".png"))
    print(format_scale(results))
    print(f"wall time {results['wall_seconds']:.0f} s; JSON {path}; chart {path.with_suffix('.png')}; "
          f"the memories: {states}")
    return 0


def run_abilities(args: argparse.Namespace) -> int:
    """--abilities / --locomo: the ability rows on one loaded backend; prints the table, writes JSON."""
    from lmm.bench.abilities import (
        AbilityConfig,
        AbilityRun,
        format_table,
        load_cases,
        load_unrelated,
        run_abilities,
    )
    from lmm.bench.engines import check_module_options, load_shared_backend
    from lmm.bench.locomo import load_locomo
    from lmm.bench.scenarios import load_distractors

    options = parse_module_options(args.mm_opt, scoped=True)
    modules = _modules(args, ["trace_bank"])
    for module in modules:  # type: ignore[union-attr]
        check_module_options(module, options.get(module, {}))  # type: ignore[arg-type]
    conversation = None
    if args.locomo is not None:
        conversation, cases = load_locomo(args.locomo, args.speaker)
        # the ability set's unrelated prompts, asked with the whole conversation in memory
        unrelated = load_unrelated(args.abilities or Path("benchmarks/abilities"))
    else:
        pool = load_distractors(args.distractors) if args.distractors.exists() else []
        cases, unrelated = load_cases(args.abilities, pool)
    if args.limit is not None:
        cases = cases[: args.limit]
    config = AbilityConfig(modules=modules, module_options=options,  # type: ignore[arg-type]
                           references=not args.no_references, answer_tokens=args.max_tokens,
                           reply_tokens=args.reply_tokens, seed=args.seed, repetition_penalty=args.repetition_penalty,
                           memory_contrast=args.memory_contrast)
    backend = load_shared_backend(args.backend, args.model, threads=args.threads)
    advance, finish = _progress(args)
    run = AbilityRun(backend, config, advance)
    try:
        results = run_abilities(run, cases, unrelated, conversation)
    finally:
        run.close()
    finish()
    results.update(command=" ".join(sys.argv), backend=backend.name, model_id=backend.model_id,
                   source=str(args.locomo or args.abilities), speaker=args.speaker if args.locomo else None)
    path = _save_json(args, "locomo" if args.locomo else "abilities", backend.name, results)
    print(format_table(results))
    print(f"wall time {results['wall_seconds']:.0f} s; JSON {path}")
    return 0


def run_recall(args: argparse.Namespace) -> int:
    """The default: recall, locality, fluency and speed per module (`lmm.bench.runner`)."""
    from lmm.bench.report import print_table, write_outputs
    from lmm.bench.runner import run_benchmark

    config = BenchConfig(
        backend=args.backend, model=args.model, modules=_modules(args, None), scenarios=args.scenarios,
        probes=args.probes, distractors=args.distractors, limit=args.limit,
        module_options=parse_module_options(args.mm_opt, scoped=True),  # type: ignore[arg-type]
        out=args.out, answer_tokens=args.max_tokens, reply_tokens=args.reply_tokens, seed=args.seed,
        references=not args.no_references, lifelong=args.lifelong, sessions=args.sessions, layer=args.layer,
        threads=args.threads, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram=args.no_repeat_ngram, memory_contrast=args.memory_contrast,
        consolidation_options=parse_module_options(args.consolidate_opt, scoped=False),  # type: ignore[arg-type]
    )
    ConsolidationConfig.from_strings(config.consolidation_options)  # a bad option fails before the run
    start = time.perf_counter()
    from lmm.bench.parallel import default_jobs

    results = run_benchmark(config, progress=not args.no_progress, jobs=args.jobs or default_jobs())
    paths = write_outputs(results, config.out_dir())
    print_table(results)
    print(f"wall time {time.perf_counter() - start:.0f} s (model load included); "
          f"JSON {paths['json']} (+ {paths['latest_json'].name}); chart {paths['png']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.scale is not None:
        run = run_scale_cli
    elif args.abilities is not None or args.locomo is not None:
        run = run_abilities
    else:
        run = run_recall
    try:
        if args.max_tokens < 1 or args.reply_tokens < 1:
            raise ValueError("--max-tokens and --reply-tokens must be >= 1")
        if args.threads < 0 or args.jobs < 0:
            raise ValueError("--threads and --jobs must be >= 0")
        if args.limit is not None and args.limit < 1:
            raise ValueError("--limit must be >= 1")
        return run(args)
    except (ValueError, OSError, ModelError, BackendError) as exc:
        print(f"lmm.bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
