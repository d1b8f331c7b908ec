"""Start-up and user-switch figures on the embedded model, measured side by side in one run.

Prints:
- time to the first prompt of the interactive chat (a pseudo-terminal, `--rounds` times): the REPL
  shows its prompt while the model loads behind it; and the time to the first reply when the
  message is typed at once (`--max-tokens 1`), both against the plain script below;
- cold start: wall time of a piped one-token chat (`python -m lmm.chat --json --max-tokens 1`,
  one message, memory `--memory`) against a plain transformers script that loads the same model
  folder and answers the same message with one token; the two alternate, `--rounds` each, and
  the ratio of the medians is printed (on a shared machine only a ratio from one run is fair);
- with `--state FILE` (a saved memory of `--memory`, e.g. `10000.safetensors` of the
  `scale_states_*` folder that `python -m lmm.bench --scale ...` leaves in its output): the time
  to load it into a running engine, and the time of the REPL's `/user NAME` between two users who
  each hold a copy of it (unchanged memories, and after one message, which must save the one left).

Usage: python scripts/bench_start.py [--memory trace_bank] [--rounds 3] [--state FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PLAIN = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=1, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:]))
"""
MESSAGE = "Hi! What is a good name for a cat?"


def timed(cmd: list[str], stdin: bytes, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, input=stdin, capture_output=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed: {proc.stderr.decode().strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def interactive(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds to the REPL's first prompt, and to the end of the first reply typed right then."""
    import pexpect

    start = time.perf_counter()
    child = pexpect.spawn(cmd[0], cmd[1:], env={**env, "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1"},
                          encoding="utf-8", timeout=300, dimensions=(40, 160))
    try:
        child.expect_exact(">> ")
        prompt = time.perf_counter() - start
        child.sendline(MESSAGE)
        child.expect_exact("tok/s")
        reply = time.perf_counter() - start
        child.expect_exact(">> ")
        time.sleep(0.5)  # Ctrl+D before prompt-toolkit has the terminal in raw mode would be lost
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    return prompt, reply


def cold_start(memory: str, rounds: int, model_dir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "LMM_HISTORY_FILE": os.devnull}
    chat = [sys.executable, "-m", "lmm.chat", "--max-tokens", "1", "--memory", memory, "--incognito",
            "--model", str(model_dir), "--backend", "torch"]
    plain = [sys.executable, "-c", PLAIN, str(model_dir), MESSAGE]
    times: dict[str, list[float]] = {"lmm chat, piped": [], "lmm REPL, first prompt": [],
                                     "lmm REPL, first reply": [], "plain transformers": []}
    for _ in range(rounds):
        times["lmm chat, piped"].append(timed([*chat, "--json"], (MESSAGE + "\n").encode(), env))
        prompt, reply = interactive(chat, env)
        times["lmm REPL, first prompt"].append(prompt)
        times["lmm REPL, first reply"].append(reply)
        times["plain transformers"].append(timed(plain, b"", env))
    plain_median = statistics.median(times["plain transformers"])
    for name, values in times.items():
        each = ", ".join(f"{v:.2f}" for v in values)
        median = statistics.median(values)
        print(f"cold start {name:<24} median {median:5.2f} s  ({each})  ratio to plain {median / plain_median:.2f}")


def user_switch(memory: str, state: Path, rounds: int, model_dir: Path) -> None:
    from lmm.commands import run_command
    from lmm.engine import ChatEngine, EngineConfig
    from lmm.session import ChatSession, user_state_path

    root = Path(tempfile.mkdtemp(prefix="lmm-switch-"))
    os.environ["LMM_ARTIFACTS"] = str(root)
    engine = ChatEngine(EngineConfig(model=str(model_dir), memory=memory, backend="torch", activation_log_path=None,
                                     background_updates=False))
    for user in ("ann", "ben"):
        target = user_state_path(user, memory)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(state, target)
    loads = []
    for _ in range(rounds):
        start = time.perf_counter()
        engine.load_memory(user_state_path("ann", memory))
        loads.append(time.perf_counter() - start)
    items = len(engine.memory_items())
    print(f"load {state.name} ({items} items, {state.stat().st_size / 1e6:.1f} MB): median "
          f"{1000 * statistics.median(loads):.0f} ms")
    if hasattr(engine.module, "route"):
        routing_and_writes(engine, items)
    session = ChatSession(engine, user="ann")
    session.start()
    unchanged, changed = [], []
    for i in range(rounds):
        for user in ("ben", "ann"):
            start = time.perf_counter()
            run_command(session, f"/user {user}")
            unchanged.append(time.perf_counter() - start)
        engine.ask(f"My locker number is {100 + i}.")  # a change: leaving this user saves the memory
        start = time.perf_counter()
        run_command(session, "/user ben")
        changed.append(time.perf_counter() - start)
        run_command(session, "/user ann")
    session.close()
    engine.close()
    print(f"/user switch, memories unchanged: median {1000 * statistics.median(unchanged):.0f} ms over "
          f"{len(unchanged)}; after a message (the memory left is saved): median "
          f"{1000 * statistics.median(changed):.0f} ms over {len(changed)}")
    shutil.rmtree(root, ignore_errors=True)


def routing_and_writes(engine: Any, items: int) -> None:
    """trace_bank in the loaded memory: a new message's routing (both stages, the message's encoding
    included; then its first stage alone, states cached), for prompts about nothing stored and for
    questions of the scale generator (stored when the memory came from `--scale`); then the write of
    new facts (the update after a user message)."""
    from lmm.bench.scale import UNRELATED, generate_facts

    facts = generate_facts(items + 10)
    questions = [f.question for f in facts[: items: max(1, items // 12)]]
    for label, texts in (("prompts about nothing stored", UNRELATED), ("questions of the scale generator", questions)):
        whole, first = [], []
        for text in texts:
            start = time.perf_counter()
            engine.module.select(text)
            whole.append(time.perf_counter() - start)
            start = time.perf_counter()
            engine.module.margins(text)
            first.append(time.perf_counter() - start)
        print(f"routing, {label}: median {1000 * statistics.median(whole):.0f} ms over {len(whole)} "
              f"(first stage alone {1000 * statistics.median(first):.1f} ms)")
    writes = []
    for fact in facts[items:]:
        start = time.perf_counter()
        engine.module.write([{"role": "user", "content": fact.statement}], 0)
        writes.append(time.perf_counter() - start)
    print(f"write of a new fact: median {1000 * statistics.median(writes):.0f} ms over {len(writes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="trace_bank")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--state", type=Path, help="a saved memory of --memory for the load and switch figures")
    parser.add_argument("--no-cold-start", action="store_true")
    args = parser.parse_args()
    from lmm.models import resolve_model

    model_dir = Path(resolve_model(None).path).resolve()
    if not args.no_cold_start:
        cold_start(args.memory, args.rounds, model_dir)
    if args.state is not None:
        user_switch(args.memory, args.state.resolve(), args.rounds, model_dir)


if __name__ == "__main__":
    main()
