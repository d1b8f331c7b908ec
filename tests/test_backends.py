"""Backend primitives on tiny random models of every family, on torch and mlx_lm.

Covers what the memory machinery relies on: the decoder layers are found, logits of a
continuation computed on a cached prefix equal a from-scratch forward, cache views never
change the session cache, the output head restricted to some positions gives the same rows,
and generation with a reused prefix equals generation from scratch.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmm.backends import DecodingConfig
from lmm.backends.base import BackendError
from lmm.backends.decoding import sample_token
from lmm.memory.base import RewriteContext
from lmm.testing import FAMILIES

MESSAGES = [
    {"role": "user", "content": "the cat sat on the mat and looked at the moon"},
    {"role": "assistant", "content": "the moon was bright"},
    {"role": "user", "content": "what did the cat see"},
]


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_found(backend_name: str, family: str, tiny_backend) -> None:
    backend = tiny_backend(backend_name, family)
    assert backend.num_layers == 4
    assert backend.layer_path == "model.layers"
    assert backend.hidden_size == 64


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_matches_full_forward(backend_name: str, family: str, tiny_backend) -> None:
    backend = tiny_backend(backend_name, family)
    ops = backend.ops
    ids = backend.formatter.generation_ids(MESSAGES)
    split = len(ids) // 2
    full = ops.to_numpy(backend.forward(ids, backend.new_cache(), "score"))
    # populate the session cache, then score the tail on a view of it
    list(backend.generate(ids[:split], DecodingConfig(max_tokens=1)))
    tail = ops.to_numpy(backend.forward_on_prefix(ids[:split], ids[split:], "score"))
    np.testing.assert_allclose(tail, full[split:], atol=2e-4, rtol=1e-4)
    # restricted head: the same rows
    rows = [0, 3, len(ids) - split - 1]
    kept = ops.to_numpy(backend.forward_on_prefix(ids[:split], ids[split:], "score", keep=rows))
    np.testing.assert_allclose(kept, full[split:][rows], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_views_leave_session_cache_intact(backend_name: str, family: str, tiny_backend) -> None:
    backend = tiny_backend(backend_name, family)
    ids = backend.formatter.generation_ids(MESSAGES)
    decoding = DecodingConfig(max_tokens=6)
    fresh = list(backend.generate(ids, decoding))
    tokens_before = list(backend._session_tokens)
    for _ in range(2):
        backend.forward_on_prefix(ids[:-3], ids[-3:], "score")
    # Sliding-window caches past their window cannot be viewed: the prefix is rebuilt as the
    # session cache instead. Either way the session cache must agree with its token list.
    assert backend.cache_length(backend._session_cache) == len(backend._session_tokens)
    assert tokens_before[: len(backend._session_tokens)] == backend._session_tokens
    if family != "gemma3":
        assert backend._session_tokens == tokens_before
    # a follow-up turn reuses the cache and still matches a from-scratch generation
    follow = ids + fresh + ids[-3:]
    reused = list(backend.generate(follow, decoding))
    assert backend.last_stats.reused_tokens > len(ids) // 2
    backend.reset_session()
    assert list(backend.generate(follow, decoding)) == reused


def test_hook_sees_phase_and_offset(backend_name: str, tiny_backend) -> None:
    backend = tiny_backend(backend_name, "llama")
    seen: list[tuple[str, int, tuple[int, ...]]] = []

    def hook(hidden, ctx: RewriteContext):
        seen.append((ctx.phase, ctx.offset, tuple(hidden.shape)))
        return hidden

    backend.install_hook(2, hook)
    try:
        ids = backend.formatter.generation_ids(MESSAGES[:1])
        list(backend.generate(ids, DecodingConfig(max_tokens=3)))
    finally:
        backend.remove_hook()
    assert seen[0] == ("generate", 0, (1, len(ids), 64))
    assert [s[1] for s in seen[1:]] == [len(ids) + i for i in range(len(seen) - 1)]
    n = len(seen)
    list(backend.generate(ids, DecodingConfig(max_tokens=3)))
    assert len(seen) == n  # removed hooks are not called


def test_sampling_is_seeded_and_identical_across_runs(backend_name: str, tiny_backend) -> None:
    backend = tiny_backend(backend_name, "qwen3")
    ids = backend.formatter.generation_ids(MESSAGES[:1])
    decoding = DecodingConfig(strategy="sample", deterministic=False, temperature=1.0, max_tokens=8, seed=3)
    a = list(backend.generate(ids, decoding))
    backend.reset_session()
    b = list(backend.generate(ids, decoding))
    assert a == b


class _Row:
    """A `decode_rows` row that samples (or takes the best) with its own seed for `n` tokens."""

    def __init__(self, strategy: str, seed: int, n: int) -> None:
        self.strategy, self.rng, self.n, self.out = strategy, np.random.default_rng(seed), n, []

    def next_token(self, scores: np.ndarray) -> int | None:
        if len(self.out) == self.n:
            return None
        self.out.append(sample_token(scores, self.strategy, 1.0, 0.9, self.rng))
        return self.out[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_decode_as_generate_does_one_at_a_time(backend_name: str, family: str, tiny_backend) -> None:
    """Rows of one prompt decoded in lockstep give each row's tokens as the frozen model's own
    generation with the same seed, rows of other lengths alongside; an installed hook and extra
    keys/values are not read (the positive control: the hook changes `generate`)."""
    from lmm.types import ExtraKV

    backend = tiny_backend(backend_name, family)
    ids = backend.formatter.generation_ids(MESSAGES)
    specs = [("greedy", 0, 7), ("sample", 1, 7), ("sample", 2, 3), ("greedy", 0, 0)]

    def one_at_a_time() -> list[list[int]]:
        backend.reset_session()
        with backend.plain_model():
            return [list(backend.generate(ids, DecodingConfig(strategy=s, temperature=1.0, seed=k, max_tokens=n,
                                                              repetition_penalty=1.0)))[:n] if n else []
                    for s, k, n in specs]

    expected = one_at_a_time()
    rows = [_Row(*spec) for spec in specs]
    backend.decode_rows(ids, rows, max_steps=10)
    assert [r.out[:len(e)] for r, e in zip(rows, expected, strict=True)] == expected
    assert max(len(e) for e in expected) >= 3  # not vacuous: a stop token did not end every row at once
    backend.install_hook(1, lambda h, ctx: h * 3.0)
    cap = backend.capture(ids[:3], kv_layers=[0])
    backend.set_extra_kv(ExtraKV(key="t", layers={0: cap.kv[0]}, visible_from=0))
    try:
        assert list(backend.generate(ids, DecodingConfig(strategy="greedy", max_tokens=7))) != expected[0]
        again = [_Row(*spec) for spec in specs]
        backend.decode_rows(ids, again, max_steps=10)  # the kept prompt cache, reused
        assert [r.out for r in again] == [r.out for r in rows]
    finally:
        backend.set_extra_kv(None)
        backend.remove_hook()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_after_the_hook_equals_the_whole_forward(backend_name: str, family: str, tiny_backend) -> None:
    """From the states a scoring pass captured at the hooked layer, the layers above it give the whole
    forward's logits and the same gradient for the hook's parameter; where a backend cannot start there
    (gemma3: sliding windows, models loaded through transformers) it says so with None."""
    backend = tiny_backend(backend_name, family)
    ops = backend.ops
    ids = backend.formatter.generation_ids(MESSAGES)
    captured, held = [], {"w": ops.asarray(np.full(64, 1.5, dtype=np.float32))}

    def hook(h, ctx: RewriteContext):
        if ctx.phase == "score":
            captured.append(h[0])
        return h * held["w"]

    backend.install_hook(2, hook)
    try:
        whole = ops.to_numpy(backend.forward(ids, backend.new_cache(), "score", keep=[3, len(ids) - 1]))
        after = backend.forward_after_hook(captured[-1], "score", keep=[3, len(ids) - 1])
        if family == "gemma3":
            assert after is None
            return
        np.testing.assert_allclose(ops.to_numpy(after), whole, atol=2e-4, rtol=1e-4)

        def loss(params, start: bool):
            held["w"] = params["w"]
            logits = (backend.forward_after_hook(captured[0], "train") if start
                      else backend.forward(ids, backend.new_cache(), "train"))
            return ops.mean(ops.log_softmax(logits, -1)[:, 7])

        grads = [ops.to_numpy(ops.value_and_grad(lambda q, s=start: loss(q, s), dict(held))[1]["w"])
                 for start in (False, True)]
        np.testing.assert_allclose(grads[1], grads[0], atol=1e-5, rtol=1e-3)
        assert np.abs(grads[0]).max() > 0  # not vacuous: the hook's parameter reaches the logits
    finally:
        backend.remove_hook()


def test_beam_search_torch(tiny_backend) -> None:
    backend = tiny_backend("torch", "llama")
    ids = backend.formatter.generation_ids(MESSAGES[:1])
    out = list(backend.generate(ids, DecodingConfig(strategy="beam", num_beams=3, max_tokens=6)))
    assert 0 < len(out) <= 6


def test_decoding_fallback_without_beam() -> None:
    assert DecodingConfig(strategy="beam").resolved(supports_beam=False) == "greedy"
    assert DecodingConfig(strategy="beam", deterministic=False).resolved(supports_beam=False) == "sample"
    assert DecodingConfig(strategy="auto", deterministic=False).resolved(True) == "sample"
    with pytest.raises(ValueError, match="top_p"):
        DecodingConfig(top_p=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_logprobs_are_the_frozen_models(backend_name: str, family: str, tiny_backend) -> None:
    """log P(ids[i] | ids[:i]) equals the log-softmax of a plain forward, also for a shorter row batched
    with it (right padding), and neither an installed hook nor extra keys/values change it (the positive
    control: the hook does change the forward)."""
    from lmm.types import ExtraKV

    backend = tiny_backend(backend_name, family)
    ops = backend.ops
    ids = backend.formatter.generation_ids(MESSAGES)
    logits = ops.to_numpy(backend.forward(ids, backend.new_cache(), "score")).astype(np.float64)
    top = logits.max(1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    expected = logp[np.arange(len(ids) - 1), ids[1:]]
    whole, short = backend.token_logprobs([ids, ids[:5]])
    np.testing.assert_allclose(whole, expected, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(short, expected[:4], atol=2e-4, rtol=1e-4)  # the shared prefix ran once
    unshared = backend.token_logprobs([ids[::-1][:3], ids])[1]  # no common prefix: one padded forward
    np.testing.assert_allclose(unshared, expected, atol=2e-4, rtol=1e-4)
    with pytest.raises(BackendError, match="two tokens"):
        backend.token_logprobs([ids, ids[:1]])
    backend.install_hook(1, lambda h, ctx: h * 3.0)
    cap = backend.capture(ids[:3], kv_layers=[0])
    backend.set_extra_kv(ExtraKV(key="t", layers={0: cap.kv[0]}, visible_from=0))
    try:
        changed = ops.to_numpy(backend.forward(ids, backend.new_cache(), "score"))
        assert not np.allclose(changed, logits, atol=1e-3)
        np.testing.assert_allclose(backend.token_logprobs([ids])[0], expected, atol=2e-4, rtol=1e-4)
    finally:
        backend.set_extra_kv(None)
        backend.remove_hook()


@pytest.mark.mlx
@pytest.mark.parametrize("family", FAMILIES)
def test_captured_keys_shift_alike_on_both_backends(family: str, tiny_backend) -> None:
    """capture(shift=s): torch computes the forward at shifted positions, mlx rotates the keys with each
    layer's own RoPE afterwards; both give the same keys, and values and hidden states do not move."""
    torch_be, mlx_be = tiny_backend("torch", family), tiny_backend("mlx_lm", family)
    ids = torch_be.formatter.generation_ids(MESSAGES)[:12]
    layers = [0, torch_be.num_layers - 1]
    got = {}
    for be in (torch_be, mlx_be):
        for shift in (0, -5):
            cap = be.capture(ids, hidden_layers=[1], kv_layers=layers, shift=shift)
            got[be.name, shift] = ([be.ops.to_numpy(cap.kv[i][0]) for i in layers],
                                   [be.ops.to_numpy(cap.kv[i][1]) for i in layers], be.ops.to_numpy(cap.hidden[1]))
    for shift in (0, -5):
        t, m = got["torch", shift], got["mlx_lm", shift]
        for a, b in zip(t[0] + t[1], m[0] + m[1], strict=True):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)
    for be in ("torch", "mlx_lm"):
        assert not np.allclose(got[be, 0][0][1], got[be, -5][0][1], atol=1e-3)  # keys move
        for a, b in zip(got[be, 0][1], got[be, -5][1], strict=True):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)  # values do not
        np.testing.assert_allclose(got[be, 0][2], got[be, -5][2], atol=2e-4, rtol=1e-3)


def test_loading_a_backend_gives_numpy_blas_one_thread(backend_name: str, tiny_models) -> None:
    """numpy's BLAS pool next to the backend's stalled every forward; a loaded backend limits it to
    one thread. Positive control: the same process had set it to two just before the load."""
    import subprocess
    import sys

    script = (
        "import sys, numpy, threadpoolctl\n"
        "from lmm.backends import load_backend\n"
        "numpy_libs = lambda: [i for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'"
        " and 'numpy' in i['filepath']]\n"
        "if not numpy_libs(): print('none'); sys.exit()\n"
        "threadpoolctl.threadpool_limits(2, user_api='blas')\n"
        "print([i['num_threads'] for i in numpy_libs()])\n"
        f"load_backend({backend_name!r}, sys.argv[1], 'tiny')\n"
        "print([i['num_threads'] for i in numpy_libs()])\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tiny_models["llama"])], capture_output=True,
                         text=True, check=True).stdout.split("\n")
    if out[0] == "none":
        pytest.skip("this numpy has no BLAS pool of its own")
    assert out[:2] == ["[2]", "[1]"]


@pytest.mark.parametrize("family", FAMILIES)
def test_system_prompt_state_is_reused_exactly(backend_name: str, family: str, tiny_backend) -> None:
    """`capture` and `token_logprobs` start from the system prompt's cached state when a turn starts with
    it and give what a forward from scratch gives, every position included; a hook and extra keys/values
    present when the state is computed do not leak into it. Positive control: the cached path is taken
    wherever the template has a system prompt and the cache keeps every position (not gemma3's sliding
    window), and the comparison sees a changed forward."""
    from lmm.types import ExtraKV

    backend = tiny_backend(backend_name, family)
    ops = backend.ops
    turn = backend.formatter.standalone_turn("My cat is called Pepper.")
    other = backend.formatter.standalone_turn("What is my cat called?")
    layers = [0, backend.num_layers - 1]

    def run() -> list[np.ndarray]:
        early = backend.capture(other.ids, hidden_layers=[1])  # stops after layer 1
        cap = backend.capture(turn.ids, hidden_layers=layers, kv_layers=layers)
        out = [ops.to_numpy(cap.hidden[i]) for i in layers] + [ops.to_numpy(early.hidden[1])]
        out += [ops.to_numpy(x) for i in layers for x in cap.kv[i]]
        return out + backend.token_logprobs([turn.ids, other.ids]) + backend.token_logprobs([turn.ids])

    backend.install_hook(1, lambda h, ctx: h * 3.0)
    backend.set_extra_kv(ExtraKV(key="t", layers={0: backend.capture(turn.ids[:3], kv_layers=[0]).kv[0]},
                                 visible_from=0))
    try:
        backend._prefix = None  # computed now, under the hook and the extra keys/values
        cached = run()
        used = backend.frozen_prefix(turn.ids) is not None
    finally:
        backend.set_extra_kv(None)
        backend.remove_hook()
    backend._prefix = False  # every forward from scratch
    try:
        plain = run()
        shifted = backend.capture(turn.ids, kv_layers=layers, shift=-4)  # not a prefix's positions
    finally:
        backend._prefix = None
    assert used == (family != "gemma3")
    assert [a.shape for a in cached] == [b.shape for b in plain]
    for a, b in zip(cached, plain, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)
    moved = ops.to_numpy(shifted.kv[layers[-1]][0])
    assert not np.allclose(moved, plain[len(layers) + 1 + 2], atol=1e-3)  # the comparison sees a change
