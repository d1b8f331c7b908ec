"""Core speed figures on the embedded model: cold start, hook overhead, update time.

Prints, for one backend and in one run (so the ratios are fair on a shared machine):
- cold start: a fresh process from interpreter start to an engine ready for the first prompt;
- tokens/s of greedy generation with no hook, with `identity`, and with `lora_on_user`,
  interleaved over several rounds, and their ratios;
- the median `lora_on_user` update time for a one-sentence message after ten turns of chat.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from lmm.backends import DecodingConfig, load_backend
from lmm.engine import ChatEngine, EngineConfig
from lmm.models import resolve_model

CHAT = [
    "Hi there, how are you today?", "Can you tell me a fun fact about octopuses?",
    "What is a good way to start learning the guitar?", "Explain photosynthesis in one sentence.",
    "What should I cook for dinner tonight?", "Give me a tip for sleeping better.",
    "Why is the sky blue?", "Recommend a classic novel.", "How do I make a paper plane?",
    "What is the tallest mountain in Europe?",
]
PROBE = "My cousin Oskar works as a lighthouse keeper in Norway."


def cold_start(backend: str) -> float:
    code = ("import time; t=time.perf_counter(); from lmm.engine import ChatEngine, EngineConfig; "
            f"ChatEngine(EngineConfig(backend={backend!r}, memory='lora_on_user', activation_log_path=None)); "
            "print(time.perf_counter()-t)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return time.perf_counter() - start if not out.stdout.strip() else float(out.stdout.strip().splitlines()[-1])


def tokens_per_second(engine_or_backend, prompt_ids, decoding) -> float:
    backend = engine_or_backend
    backend.reset_session()
    list(backend.generate(prompt_ids, decoding))
    return backend.last_stats.tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    starts = [cold_start(args.backend) for _ in range(2)]
    print(f"cold start to first prompt (process start -> engine ready): "
          f"{', '.join(f'{s:.2f}' for s in starts)} s (python interpreter start excluded)")

    resolved = resolve_model(None)
    backend = load_backend(args.backend, resolved.path, resolved.model_id)
    decoding = DecodingConfig(max_tokens=args.tokens)
    prompt = backend.formatter.generation_ids([{"role": "user", "content": "Write a short story about a robot."}])
    # ignore stop tokens so every run generates the same number of tokens
    stop, backend.formatter.stop_ids = backend.formatter.stop_ids, set()
    rates: dict[str, list[float]] = {"plain": [], "identity": [], "lora_on_user": []}
    engines = {}
    for _ in range(args.rounds):
        for name in rates:
            backend.remove_hook()
            if name != "plain":
                engines[name] = ChatEngine(EngineConfig(memory=name, activation_log_path=None, decoding=decoding),
                                           backend=backend)
            rates[name].append(tokens_per_second(backend, prompt, decoding))
            if name != "plain":
                engines[name].close()
    backend.formatter.stop_ids = stop
    base = statistics.median(rates["plain"])
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"tokens/s {name:<13} median {med:6.1f} over {len(values)} runs  (ratio to plain {med / base:.3f})")

    engine = ChatEngine(EngineConfig(memory="lora_on_user", activation_log_path=None, background_updates=False,
                                     decoding=DecodingConfig(max_tokens=48)), backend=backend)
    for text in CHAT:
        engine.ask(text)
    times = []
    for _ in range(args.rounds):
        turn = engine.ask(PROBE)
        times.append(turn.update.seconds)
        engine.messages = engine.messages[:-2]  # keep the history at ten turns
    print(f"lora_on_user update after {len(CHAT)} turns, one sentence: median {statistics.median(times):.3f} s "
          f"(runs: {', '.join(f'{t:.3f}' for t in times)}; history {len(engine.backend._session_tokens)} tokens)")
    engine.close()


if __name__ == "__main__":
    main()
