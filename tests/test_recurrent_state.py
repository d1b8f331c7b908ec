"""recurrent_state on the tiny models, both backends: identity, session state, written long-term slots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmm.backends import DecodingConfig
from lmm.engine import ChatEngine, EngineConfig
from lmm.memory import create_memory
from lmm.memory.base import RewriteContext
from lmm.memory.recurrent_state import RecurrentState, RecurrentStateConfig

BACKENDS = ("torch", pytest.param("mlx_lm", marks=pytest.mark.mlx))
FACT = "My name is Alice and I live in Paris."



def engine(be: Any, **options: Any) -> ChatEngine:
    cfg = EngineConfig(memory="recurrent_state", memory_options={k: str(v) for k, v in options.items()},
                       activation_log_path=None, background_updates=False,
                       decoding=DecodingConfig(max_tokens=6))
    return ChatEngine(cfg, backend=be)


def module_of(eng: ChatEngine) -> RecurrentState:
    assert isinstance(eng.module, RecurrentState)
    return eng.module


def fresh(be: Any, **options: Any) -> RecurrentState:
    module = create_memory("recurrent_state", hidden_size=be.hidden_size, ops=be.ops, seed=0,
                           config=RecurrentStateConfig(**options))
    assert isinstance(module, RecurrentState)
    return module


def hidden(be: Any, t: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, size=(1, t, be.hidden_size)).astype(np.float32)


@pytest.mark.parametrize("field, value", [
    ("d_state", 0), ("num_slots", 0), ("merge_threshold", 1.5), ("read_temperature", 0.0),
    ("min_decay", 0.0), ("max_decay", 1.0), ("steps", -1),
])
def test_config_rejects_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        RecurrentStateConfig(**{field: value})


@pytest.mark.parametrize("name", BACKENDS)
def test_fresh_module_is_exactly_the_identity(name: str, tiny_backend) -> None:
    be = tiny_backend(name)
    module, ops = fresh(be), be.ops
    x = hidden(be, 7)
    for phase, offset in (("generate", 0), ("generate", 7), ("score", 3), ("train", 14)):
        out = module.rewrite(ops.asarray(x), RewriteContext(phase=phase, offset=offset))
        assert np.array_equal(ops.to_numpy(out), x)


@pytest.mark.parametrize("name", BACKENDS)
def test_state_follows_the_cache_and_only_generate_advances_it(name: str, tiny_backend) -> None:
    be = tiny_backend(name)
    ops = be.ops
    x = hidden(be, 9)
    whole, pieces = fresh(be), fresh(be)
    w_o = ops.asarray(np.random.default_rng(3).normal(0, 0.1, size=(128, be.hidden_size)).astype(np.float32))
    whole.params["w_o"] = pieces.params["w_o"] = w_o
    out_whole = ops.to_numpy(whole.rewrite(ops.asarray(x), RewriteContext("generate", 0)))
    pieces.rewrite(ops.asarray(x[:, :6]), RewriteContext("generate", 0))
    pieces.rewrite(ops.asarray(x[:, 6:8] * 5), RewriteContext("generate", 6))  # later cut back to 6
    hist = ops.to_numpy(pieces.buffers["state_hist"]).copy()
    out_score = ops.to_numpy(pieces.rewrite(ops.asarray(x[:, 6:]), RewriteContext("score", 6)))
    pieces.rewrite(ops.asarray(x[:, 6:]), RewriteContext("train", 6))
    np.testing.assert_array_equal(ops.to_numpy(pieces.buffers["state_hist"]), hist)  # unchanged
    out_last = ops.to_numpy(pieces.rewrite(ops.asarray(x[:, 6:]), RewriteContext("generate", 6)))
    assert pieces.buffers["state_hist"].shape[1] == 10  # initial state + 9 positions
    np.testing.assert_allclose(ops.to_numpy(pieces.buffers["state_hist"]),
                               ops.to_numpy(whole.buffers["state_hist"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_last, out_whole[:, 6:], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out_score, out_last, rtol=1e-5, atol=1e-4)  # score starts from the session


@pytest.mark.parametrize("name", BACKENDS)
def test_reset_session_clears_the_short_term_state(name: str, tiny_backend) -> None:
    eng = engine(tiny_backend(name))
    module = module_of(eng)
    eng.ask(FACT)
    assert module.summary()["session_positions"] > 0 and module.summary()["state_norm"] > 0
    eng.reset_chat()
    assert "state_hist" not in module.buffers and module.summary()["session_positions"] == 0
    x = hidden(eng.backend, 4)
    a = module.rewrite(eng.backend.ops.asarray(x), RewriteContext("generate", 0))
    module.reset_session()
    b = module.rewrite(eng.backend.ops.asarray(x), RewriteContext("generate", 0))
    np.testing.assert_array_equal(eng.backend.ops.to_numpy(a), eng.backend.ops.to_numpy(b))


@pytest.mark.parametrize("name", BACKENDS)
def test_update_lowers_loss_and_writes_long_term_slots(name: str, tiny_backend,
                                                       tmp_path: Path) -> None:
    """Fails if long-term memory is never written (the bug recorded in the seed)."""
    be = tiny_backend(name)
    eng = engine(be)
    module = module_of(eng)
    assert module.summary()["slots_written"] == 0
    updates = [eng.ask(text).update for text in (FACT, "I have a cat called Pepper.")]
    for update in updates:
        assert update is not None and update.skipped is None and update.loss_after < update.loss
    writes = module.ops.to_numpy(module.buffers["slot_writes"])
    slots = module.ops.to_numpy(module.buffers["slots"])
    assert writes.sum() == 2 and module.summary()["slots_written"] >= 1
    assert np.all(np.linalg.norm(slots[writes > 0], axis=1) > 0)
    assert np.all(slots[writes == 0] == 0)

    path = eng.save_memory(tmp_path / "rec.safetensors")
    other = engine(be)
    other.load_memory(path)
    loaded = module_of(other)
    for key in ("slots", "slot_usage", "slot_writes", "slot_last_write"):
        np.testing.assert_array_equal(loaded.ops.to_numpy(loaded.buffers[key]),
                                      module.ops.to_numpy(module.buffers[key]))
    assert "buffer.state_hist" not in loaded.state_tensors()  # the short-term state is not saved
    # The loaded slots are read: the rewrite changes when they are wiped.
    x = be.ops.asarray(hidden(be, 5))
    with_slots = be.ops.to_numpy(loaded.rewrite(x, RewriteContext("score", 0)))
    _, attn = loaded._read_long(loaded.scan(x / 3.0, be.ops.zeros((1, 64)), loaded.params), loaded.params)
    assert float(be.ops.to_numpy(attn).sum()) > 0
    loaded.buffers["slot_writes"] = be.ops.zeros((loaded.cfg.num_slots,))
    assert not np.allclose(be.ops.to_numpy(loaded.rewrite(x, RewriteContext("score", 0))), with_slots)


@pytest.mark.parametrize("name", BACKENDS)
def test_slot_policy_merges_similar_and_evicts_least_used(name: str, tiny_backend) -> None:
    module = fresh(tiny_backend(name), num_slots=2, merge_threshold=0.9, d_state=4)
    a, b, c = np.eye(4, dtype=np.float32)[:3]
    assert module.write_slot(a) == 0
    assert module.write_slot(a * 2 + 0.01 * b) == 0  # merged: cosine > 0.9
    assert module.write_slot(b) == 1
    usage = module.ops.to_numpy(module.buffers["slot_usage"])
    assert usage.tolist() == [2.0, 1.0]
    assert module.write_slot(c) == 1  # full: evicts the least used
    assert module.ops.to_numpy(module.buffers["slot_writes"]).tolist() == [2.0, 1.0]
    np.testing.assert_allclose(module.ops.to_numpy(module.buffers["slots"])[1], c)


def test_torch_and_mlx_agree_after_a_session(tiny_backend) -> None:
    results = {}
    for name in ("torch", "mlx_lm"):
        eng = engine(tiny_backend(name))
        replies = [eng.ask(text).assistant for text in (FACT, "Where do I live?")]
        results[name] = (replies, module_of(eng).state_tensors(), module_of(eng).summary())
    (r_t, s_t, m_t), (r_m, s_m, m_m) = results["torch"], results["mlx_lm"]
    assert r_t == r_m and m_t["slot_writes"] == m_m["slot_writes"]
    # float32 on both; kernel summation order differs and adam amplifies it a little:
    # 1e-3 on O(1) parameters and slots (measured max 7e-6 on tiny llama, 2e-5 on qwen3; not
    # gemma3, whose mlx loss re-runs the prefix under the trained parameters: 1.4e-2).
    for key in s_t:
        np.testing.assert_allclose(s_t[key], s_m[key], atol=1e-3, rtol=1e-3, err_msg=key)
