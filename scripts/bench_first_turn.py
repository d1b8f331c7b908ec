"""The first statement and the first question of a new process, with an empty and with a filled model cache.

trace_bank's write gate and routing calibration depend on the model only; `lmm.model_cache` keeps them
on disk. This runs the same two turns (a statement, then a question about it; embedded model, torch,
one thread, synchronous updates) in two new processes sharing one fresh cache folder: the first fills
it, the second reads it. Prints, per process, the statement's update time and the question's turn time.

Usage: python scripts/bench_first_turn.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

STATEMENT = "My bike lock code is 2905."
QUESTION = "What is my bike lock code?"


def child() -> None:
    import torch

    from lmm.backends import DecodingConfig
    from lmm.engine import ChatEngine, EngineConfig

    torch.set_num_threads(1)
    engine = ChatEngine(EngineConfig(memory="trace_bank", backend="torch", activation_log_path=None,
                                     background_updates=False, decoding=DecodingConfig(max_tokens=12)))
    try:
        engine.ask(STATEMENT)
        update = engine.last_update.seconds if engine.last_update else float("nan")
        start = time.perf_counter()
        answer = engine.ask(QUESTION).assistant
        print(f"statement's update {update:6.2f} s · question's turn {time.perf_counter() - start:5.2f} s · "
              f"answer: {answer[:50]!r}")
    finally:
        engine.close()


def main() -> None:
    if "--child" in sys.argv:
        child()
        return
    with tempfile.TemporaryDirectory(prefix="lmm-first-turn-") as cache:
        env = {**os.environ, "LMM_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        for label in ("empty cache ", "filled cache"):
            out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                                 check=True)
            print(f"{label}: {out.stdout.strip()}")


if __name__ == "__main__":
    main()
