"""Shared helpers of the trace_bank test files: engines on the tiny models, writing without a reply,
greedy replies, the plain model's reply and logits, state digests, random extra keys/values."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from lmm.backends import DecodingConfig
from lmm.engine import ChatEngine, EngineConfig
from lmm.memory.trace_bank import TraceBank
from lmm.types import ExtraKV

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("mlx_lm", id="mlx_lm", marks=pytest.mark.mlx)]
FACT = "My name is Alice and I live in Paris."
OTHER = "I have a cat called Pepper."
UNRELATED = "Hello! How are you today?"
MAX_TOKENS = 8



def engine(be: Any, **options: Any) -> ChatEngine:
    # A random-weight model's states say nothing about what informs, nor its likelihoods about what is
    # relevant: tiny models store every sentence and route on the first stage's margin alone.
    options = {"dtype": "float32", "write_gate": "all", "relevance": 0.0, "margin_weight": 1000.0, **options}
    cfg = EngineConfig(memory="trace_bank", memory_options={k: str(v) for k, v in options.items()},
                       activation_log_path=None, background_updates=False,
                       decoding=DecodingConfig(max_tokens=MAX_TOKENS))
    return ChatEngine(cfg, backend=be)


def bank(eng: ChatEngine) -> TraceBank:
    assert isinstance(eng.module, TraceBank)
    return eng.module


def teach(eng: ChatEngine, text: str) -> None:
    """Write `text` the way the learner does, without generating a reply."""
    bank(eng).write([{"role": "user", "content": text}], 0)
    eng.backend.reset_session()


def reply(eng: ChatEngine, text: str) -> list[int]:
    """Greedy reply tokens of a fresh chat (the engine's path, every token id kept)."""
    eng.reset_chat()
    return eng.respond([{"role": "user", "content": text}]).tokens


def route(be: Any, text: str) -> list[int]:
    """Prompt ids of `text`, routed by whichever module's hook the backend holds (as an engine would)."""
    messages = [{"role": "user", "content": text}]
    if be.installed_hook is not None:
        be.installed_hook.module.before_reply(messages)
    return be.formatter.generation_ids(messages)


def plain_reply(be: Any, text: str) -> list[int]:
    ids = route(be, text)
    be.reset_session()
    out = list(be.generate(ids, DecodingConfig(max_tokens=MAX_TOKENS)))
    be.reset_session()
    return out


def prompt_logits(be: Any, text: str) -> np.ndarray:
    ids = route(be, text)
    return be.ops.to_numpy(be.forward(ids, be.new_cache(), "generate"))


def digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].dtype.str.encode() + np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()


def random_extra(be: Any, layers: list[int], n: int, visible_from: int, seed: int = 0) -> ExtraKV:
    cap = be.capture([1, 2, 3], kv_layers=layers)
    kv_heads, head_dim = cap.kv[layers[0]][0].shape[1], cap.kv[layers[0]][0].shape[3]
    rng = np.random.default_rng(seed)
    arrays = {i: tuple(be.ops.asarray(rng.normal(0, 1, (1, kv_heads, n, head_dim)).astype(np.float32))
                       for _ in range(2)) for i in layers}
    return ExtraKV(key=("test", seed, n), layers=arrays, visible_from=visible_from)
