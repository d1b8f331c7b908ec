"""State file size and update time per memory module after N user messages (embedded model).

Every registered module (or `--modules`) chats through the same N neutral messages with short
replies, with the crash-safe autosave on as in a chat with a save path; the script prints the
saved state size, the median and p95 update time per message, and the median cost of crash
safety per update (the finiteness check of the new state plus its atomic autosave, paid after
the update in the background) with its ratio to the update time, all measured in one run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lmm.bench.engines import load_shared_backend, new_engine
from lmm.bench.metrics import median, p95
from lmm.memory import memory_names

MESSAGES = [
    "My name is Jonas and I repair bicycles for a living.", "Can you explain how tides work?",
    "I moved to Tallinn last spring.", "What is a good stretch for a stiff neck?",
    "My daughter Ilse turns seven in May.", "Why do cats purr?", "I drive an old green Volvo.",
    "Suggest a quick vegetarian lunch.", "My favourite band is Kraftwerk.", "How far away is the moon?",
    "I am learning to play the cello.", "What is the difference between weather and climate?",
    "My locker number at the gym is 318.", "Give me a tip for remembering names.",
    "I grew up on a farm near Tartu.", "What does a barometer measure?", "My brother Mart is a chef.",
    "Explain compound interest simply.", "I am allergic to walnuts.", "What makes bread rise?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--modules", default=",".join(memory_names()))
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--reply-tokens", type=int, default=16)
    args = parser.parse_args()
    backend = load_shared_backend(args.backend, None)
    print(f"{args.messages} user messages, replies of {args.reply_tokens} tokens, {args.backend}")
    print(f"{'module':<16} {'state bytes':>12} {'update median':>14} {'update p95':>11} {'safety median':>14} "
          f"{'safety/update':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.modules.split(","):
            engine = new_engine(backend, name, None, max_tokens=args.reply_tokens, seed=0)
            engine.set_autosave(Path(tmp) / f"{name}.safetensors.unsaved")
            times, safety = [], []
            for text in (MESSAGES * 2)[: args.messages]:
                update = engine.ask(text).update
                times.append(update.seconds)
                if update.autosave_seconds is not None:
                    safety.append(update.autosave_seconds)
            path = engine.save_memory(Path(tmp) / f"{name}.safetensors")
            engine.close()
            ratio = median(safety) / median(times) if safety else float("nan")
            print(f"{name:<16} {path.stat().st_size:>12,} {median(times):>13.3f}s {p95(times):>10.3f}s "
                  f"{median(safety):>13.4f}s {ratio:>14.3f}")
    backend.close()


if __name__ == "__main__":
    main()
