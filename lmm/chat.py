"""`python -m lmm.chat`: the command line. A thin layer over `ChatEngine` and `ChatSession`.

Owns the flags, turning them into an `EngineConfig`, choosing the memory paths, the
interactive/piped split (a terminal gets the REPL, anything else reads one message per
line) and the exit rules: `exit`, `quit`, `/exit` and EOF save; Ctrl+C at the prompt
leaves without saving and says so. Fatal problems print one line and exit non-zero.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from lmm.backends import BackendError, DecodingConfig
from lmm.commands import is_command, run_command
from lmm.engine import ChatEngine, EngineConfig
from lmm.models import ModelError
from lmm.session import ChatSession
from lmm.state import StateFileError

EXIT_WORDS = {"exit", "quit"}
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _fail(message: str, code: int = 2) -> typer.Exit:
    print(f"lmm: error: {message}", file=sys.stderr)
    return typer.Exit(code)


def _notice(message: str) -> None:
    print(f"lmm: {message}", file=sys.stderr)


def parse_options(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--mm-opt expects key=value, got {pair!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


@app.command()
def main(
    model: Annotated[str | None, typer.Option(help="Local HF folder or hub id (default: embedded SmolLM2)")] = None,
    backend: Annotated[str, typer.Option(help="auto | mlx_lm | torch")] = "auto",
    device: Annotated[str, typer.Option(help="torch device: auto | cpu | cuda | mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="torch dtype: auto | float32 | float16 | bfloat16")] = "auto",
    local_files_only: Annotated[bool, typer.Option("--local-files-only", help="Never use the network")] = False,
    memory: Annotated[str, typer.Option(help="Memory module name")] = "identity",
    mm_opt: Annotated[list[str] | None, typer.Option("--mm-opt", help="Module option key=value (repeatable)")] = None,
    layer: Annotated[int | None, typer.Option(help="Hooked decoder layer (default: the middle one)")] = None,
    seed: Annotated[int, typer.Option(help="Seed for module init and sampling")] = 0,
    system_prompt: Annotated[str | None, typer.Option(help="System prompt")] = None,
    deterministic: Annotated[bool, typer.Option("--deterministic/--non-deterministic")] = True,
    decoding_strategy: Annotated[str, typer.Option(help="auto | greedy | beam | sample")] = "auto",
    temperature: Annotated[float, typer.Option()] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.9,
    max_tokens: Annotated[int, typer.Option()] = 256,
    num_beams: Annotated[int, typer.Option(help="Beams for --decoding-strategy beam")] = 4,
    mm_load_path: Annotated[Path | None, typer.Option(help="Memory state to load at start")] = None,
    mm_save_path: Annotated[Path | None, typer.Option(help="Where to save the memory at exit")] = None,
    mm_path: Annotated[Path | None, typer.Option(help="Legacy: sets both load and save path")] = None,
    user: Annotated[str | None, typer.Option(help="Keep memory per user under artifacts/users/NAME/")] = None,
    incognito: Annotated[bool, typer.Option("--incognito", help="No updates, nothing saved")] = False,
    activation_log_path: Annotated[Path, typer.Option()] = Path("logs/memory_activations.jsonl"),
    no_activation_log: Annotated[bool, typer.Option("--no-activation-log", help="Log updates only")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Piped mode: one JSON object per turn")] = False,
) -> None:
    """Chat with a local model whose memory lives in a middle layer."""
    load_path = mm_load_path or mm_path
    save_path = mm_save_path or mm_path
    if user is not None and (load_path or save_path):
        raise _fail("--user chooses the memory paths itself; do not combine it with --mm-*-path")
    try:
        decoding = DecodingConfig(strategy=decoding_strategy, deterministic=deterministic,  # type: ignore[arg-type]
                                  temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                  num_beams=num_beams, seed=seed)
        config = EngineConfig(
            model=model, backend=backend, device=device, dtype=dtype, local_files_only=local_files_only,
            memory=memory, memory_options=parse_options(mm_opt or []), layer=layer, seed=seed,
            system_prompt=system_prompt, decoding=decoding, activation_log_path=activation_log_path,
            log_activations=not no_activation_log,
        )
        engine = ChatEngine(config, on_notice=_notice)
        session = ChatSession(engine, user=user, load_path=load_path, save_path=save_path,
                              incognito=incognito, notice=_notice)
        session.start()
    except (ModelError, BackendError, StateFileError, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None

    interactive = sys.stdin.isatty() and not as_json
    if interactive:
        from lmm.repl import run_repl

        code = run_repl(session)
    else:
        code = run_piped(session, as_json=as_json)
    engine.close()
    raise typer.Exit(code)


def _finish(session: ChatSession, save: bool) -> None:
    if not save:
        _notice("interrupted: memory not saved")
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
    app()
