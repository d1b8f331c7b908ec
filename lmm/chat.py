"""`python -m lmm.chat`: the command line. A thin layer over `ChatEngine` and `ChatSession`.

Owns the flags, turning them into an `EngineConfig`, choosing the memory paths, the
interactive/piped split (a terminal gets the REPL, anything else reads one message per
line) and the exit rules: `exit`, `quit`, `/exit` and EOF save; Ctrl+C at the prompt
leaves without keeping the session's changes and says so. Fatal problems print one line
and exit non-zero. The help is plain argparse: every flag shows in full at any width.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from lmm.backends import BackendError, DecodingConfig
from lmm.commands import is_command, run_command
from lmm.engine import ChatEngine, EngineConfig
from lmm.models import EMBEDDED_MODEL_ID, ModelError, model_on_disk
from lmm.session import ChatSession, SessionOpenError, SessionOpening, validate_user
from lmm.state import StateFileError

EXIT_WORDS = {"exit", "quit"}
_USER_ERRORS = (ModelError, BackendError, StateFileError, ValueError, FileNotFoundError)
_DECODING = DecodingConfig()


def _notice(message: str) -> None:
    print(f"lmm: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, exit 2 (argparse's default prints the whole usage block first)."""
        self.exit(2, f"lmm: error: {message} (see python -m lmm.chat --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lmm.chat",
                description="Chat with a local model whose memory lives inside the model.")
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="PATH_OR_ID", help="local Hugging Face folder or hub id "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    m.add_argument("--local-files-only", action="store_true", help="never use the network")
    m.add_argument("--backend", default="auto", metavar="NAME",
                   help="auto, mlx_lm or torch (default: auto, mlx_lm on Apple Silicon)")
    m.add_argument("--device", default="auto", metavar="NAME", help="torch: auto, cpu, cuda or mps")
    m.add_argument("--dtype", default="auto", metavar="NAME", help="torch: auto, float32, float16 or bfloat16")

    mem = p.add_argument_group("memory")
    mem.add_argument("--memory", default="identity", metavar="NAME", help="memory module (default: identity)")
    mem.add_argument("--mm-opt", action="append", default=[], metavar="KEY=VALUE",
                     help="module option, repeatable (e.g. --mm-opt rank=16)")
    mem.add_argument("--layer", type=int, metavar="N", help="hooked decoder layer (default: the middle one)")
    mem.add_argument("--user", metavar="NAME", help="keep memory per user under artifacts/users/NAME/")
    mem.add_argument("--mm-load-path", type=Path, metavar="PATH", help="memory state to load at start")
    mem.add_argument("--mm-save-path", type=Path, metavar="PATH", help="where to save the memory at exit")
    mem.add_argument("--mm-path", type=Path, metavar="PATH", help="sets both the load and the save path")
    mem.add_argument("--incognito", action="store_true", help="no updates, nothing written")
    mem.add_argument("--consolidate", action="store_true",
                     help="gradient modules: after each reply, distil each statement into the module's weights")
    mem.add_argument("--consolidate-opt", action="append", default=[], metavar="KEY=VALUE",
                     help="a consolidation option, repeatable (e.g. max_drift=0.2; see docs/consolidation.md)")

    d = p.add_argument_group("decoding")
    d.add_argument("--seed", type=int, default=0, metavar="N", help="module init and sampling seed (default 0)")
    d.add_argument("--deterministic", dest="deterministic", action="store_true", default=True,
                   help="greedy decoding (the default)")
    d.add_argument("--non-deterministic", dest="deterministic", action="store_false",
                   help="sample with --temperature and --top-p")
    d.add_argument("--decoding-strategy", default="auto", metavar="NAME",
                   help="auto, greedy, beam or sample (auto follows --deterministic)")
    d.add_argument("--temperature", type=float, default=_DECODING.temperature, metavar="T",
                   help=f"sampling temperature (default {_DECODING.temperature})")
    d.add_argument("--top-p", type=float, default=_DECODING.top_p, metavar="P",
                   help=f"nucleus sampling mass (default {_DECODING.top_p})")
    d.add_argument("--max-tokens", type=int, default=_DECODING.max_tokens, metavar="N",
                   help=f"longest reply in tokens (default {_DECODING.max_tokens})")
    d.add_argument("--num-beams", type=int, default=_DECODING.num_beams, metavar="N",
                   help=f"beams for --decoding-strategy beam (default {_DECODING.num_beams})")
    d.add_argument("--repetition-penalty", type=float, default=_DECODING.repetition_penalty, metavar="F",
                   help=f"penalise tokens repeated within the reply, which stops loops (default "
                        f"{_DECODING.repetition_penalty}; 1 turns it off)")
    d.add_argument("--memory-contrast", type=float, default=_DECODING.memory_contrast, metavar="F",
                   help="while the memory is read (trace_bank), favour what it changes: log-probabilities "
                        f"(1+F) x with it - F x without it, greedy and sampling (default {_DECODING.memory_contrast}; "
                        "0 turns it off)")
    d.add_argument("--system-prompt", metavar="TEXT", help="system prompt")

    o = p.add_argument_group("output")
    o.add_argument("--json", dest="as_json", action="store_true", help="piped mode: one JSON object per turn")
    o.add_argument("--activation-log-path", type=Path, default=Path("logs/memory_activations.jsonl"),
                   metavar="PATH", help="JSONL log of activations and updates (default: %(default)s)")
    o.add_argument("--no-activation-log", action="store_true", help="log updates only")
    return p


def parse_options(pairs: list[str], flag: str = "--mm-opt") -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects key=value, got {pair!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_path = args.mm_load_path or args.mm_path
    save_path = args.mm_save_path or args.mm_path
    if args.user is not None and (load_path or save_path):
        return _fail("--user chooses the memory paths itself; do not combine it with --mm-*-path")
    try:
        decoding = DecodingConfig(strategy=args.decoding_strategy, deterministic=args.deterministic,
                                  temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                                  num_beams=args.num_beams, seed=args.seed,
                                  repetition_penalty=args.repetition_penalty,
                                  memory_contrast=args.memory_contrast)
        config = EngineConfig(
            model=args.model, backend=args.backend, device=args.device, dtype=args.dtype,
            local_files_only=args.local_files_only, memory=args.memory, memory_options=parse_options(args.mm_opt),
            layer=args.layer, seed=args.seed, system_prompt=args.system_prompt, decoding=decoding,
            activation_log_path=args.activation_log_path, log_activations=not args.no_activation_log,
            consolidate=args.consolidate,
            consolidation_options=parse_options(args.consolidate_opt, "--consolidate-opt"),
        )
        if args.user is not None:
            validate_user(args.user)
    except ValueError as exc:
        return _fail(str(exc))

    def open_session(notice: Callable[[str], None]) -> ChatSession:
        engine = ChatEngine(config, on_notice=notice)
        session = ChatSession(engine, user=args.user, load_path=load_path, save_path=save_path,
                              incognito=args.incognito, notice=notice)
        session.start()
        return session

    if sys.stdin.isatty() and not args.as_json:
        return _interactive(open_session, args, config)
    try:
        session = open_session(_notice)
    except _USER_ERRORS as exc:
        return _fail(str(exc))
    try:
        code = run_piped(session, as_json=args.as_json)
    finally:
        session.close()
    session.engine.close()
    return code


def _interactive(open_session: Callable[[Callable[[str], None]], ChatSession], args: argparse.Namespace,
                 config: EngineConfig) -> int:
    """The REPL. A model already on disk loads on a background thread while the prompt takes the first
    message; one still to be converted or downloaded (with its progress lines) loads first."""
    from lmm.repl import run_repl

    if model_on_disk(config.model):
        def opened_or_reason(notice: Callable[[str], None]) -> ChatSession:
            try:
                return open_session(notice)
            except _USER_ERRORS as exc:
                raise SessionOpenError(str(exc)) from None

        opening = SessionOpening(opened_or_reason, user=args.user, incognito=args.incognito,
                                 label=config.model or EMBEDDED_MODEL_ID, memory=config.memory)
    else:
        try:
            opening = SessionOpening.opened(open_session(_notice))
        except _USER_ERRORS as exc:
            return _fail(str(exc))
    try:
        code = run_repl(opening)
    except SessionOpenError as exc:
        return _fail(str(exc))
    finally:
        if opening.done() and opening.session is not None:
            opening.session.close()  # the lock goes with the process anyway; this is the tidy way
    if not opening.done():  # left before the model had loaded: nothing was changed or written
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the loading thread may be inside a native library; do not wait for it
    if opening.session is not None:
        opening.session.engine.close()
    return code


def _fail(message: str, code: int = 2) -> int:
    print(f"lmm: error: {message}", file=sys.stderr)
    return code


def _finish(session: ChatSession, save: bool) -> None:
    if not save:
        session.discard()
        _notice("interrupted: memory not saved (this session's changes are discarded)")
        return
    path = session.save()
    if path is not None:
        _notice(f"memory saved to {path}")


def run_piped(session: ChatSession, *, as_json: bool) -> int:
    """One user message per input line; EOF ends the session and saves."""
    stdin = open(sys.stdin.fileno(), encoding="utf-8", errors="replace", closefd=False)
    save = True
    try:
        for raw in stdin:
            line = raw.strip()
            if not line:
                continue
            if line.lower() in EXIT_WORDS:
                break
            if is_command(line):
                try:
                    result = run_command(session, line)
                except (StateFileError, ValueError, FileNotFoundError) as exc:
                    _notice(f"error: {exc}")
                    continue
                if result.text:
                    _notice(result.text)
                if result.exit:
                    save = result.save_on_exit
                    break
                continue
            turn = session.engine.ask(line)
            if as_json:
                print(json.dumps(turn.to_json(), ensure_ascii=False), flush=True)
            else:
                print(turn.assistant, flush=True)
    except KeyboardInterrupt:
        save = False
    try:
        _finish(session, save)
    except (OSError, StateFileError) as exc:
        _notice(f"error: saving failed: {exc}")
        return 1
    return 0 if save else 130


if __name__ == "__main__":
    sys.exit(main())
