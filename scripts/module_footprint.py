"""State file size and update time per memory module after N user messages (embedded model).

Every registered module (or `--modules`) chats through the same N neutral messages with short
replies; the script prints the saved state size, the median and p95 update time per message and
the wall time, all measured in one run so the modules can be compared.
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
    print(f"{'module':<16} {'state bytes':>12} {'update median':>14} {'update p95':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.modules.split(","):
            engine = new_engine(backend, name, None, max_tokens=args.reply_tokens, seed=0)
            times = []
            for text in (MESSAGES * 2)[: args.messages]:
                turn = engine.ask(text)
                times.append(turn.update.seconds)
            path = engine.save_memory(Path(tmp) / f"{name}.safetensors")
            engine.close()
            print(f"{name:<16} {path.stat().st_size:>12,} {median(times):>13.3f}s {p95(times):>10.3f}s")


if __name__ == "__main__":
    main()
