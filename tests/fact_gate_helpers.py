"""Shared helpers of the fact-gate test files (`test_fact_gate.py`, `test_hash_tables.py`): an engine with a
gated module on a tiny model, and one statement consolidated into it by a fast learner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmm.backends import DecodingConfig
from lmm.consolidation import GUARD_PROMPTS, GUARD_TRAIN, ConsolidationConfig, Consolidator
from lmm.engine import ChatEngine, EngineConfig
from lmm.memory.fact_gate import FactGate

QUESTIONS = ["Where is the red kite kept?", "What is kept in the garden shed?"]
ANSWER = "The red kite is in the shed."
FAST = dict(lr=0.05, steps=3, epochs=2, guards_per_step=1, guard_tokens=4, drift_tokens=4, max_drift=1.0)


def engine_for(be: Any, tmp_path: Path, memory: str = "chaptered_bank", **options: str) -> ChatEngine:
    return ChatEngine(EngineConfig(memory=memory, memory_options=options, activation_log_path=tmp_path / "log.jsonl",
                                   background_updates=False, decoding=DecodingConfig(max_tokens=6)), backend=be)


def consolidated(engine: ChatEngine) -> Any:
    module = engine.module
    assert isinstance(module, FactGate)
    teacher = Consolidator(engine.backend, ConsolidationConfig(**FAST))
    with module.consolidating(QUESTIONS, GUARD_PROMPTS[:GUARD_TRAIN]):
        summary = teacher.learn(module, engine.hook, [teacher.example(q, ANSWER) for q in QUESTIONS])
    assert summary.loss_after < summary.loss and not summary.rolled_back
    return module
