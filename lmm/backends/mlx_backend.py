"""mlx_lm backend (Apple Silicon; the CPU build of mlx on Linux).

Owns loading a Hugging Face folder with `mlx_lm.utils.load_model`, the hook on the chosen
decoder layer (a per-instance subclass whose `__call__` passes the output through the
memory hook, so every other attribute of the layer stays as it was), mlx_lm prompt-cache
views and trimming, and `MlxOps`. mlx_lm exposes no beam search: `beam` falls back, and
the CLI says so at start. Imports mlx lazily through this module only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lmm.backends.attention_memory import AttentionPlan, StopForward, mlx_layer_scope
from lmm.backends.base import (
    Backend,
    BackendError,
    FrozenPrefix,
    check_logprob_batch,
    find_layers,
    join_logprobs,
)
from lmm.chat_format import ChatFormatter
from lmm.chat_tokenizer import load_tokenizer
from lmm.ops import Params
from lmm.types import Captured, HookFn


@dataclass
class MlxOps:
    name: str = "mlx"

    def asarray(self, x: Any, dtype: str = "float32") -> mx.array:
        return mx.array(np.asarray(x)).astype(getattr(mx, dtype))

    def to_numpy(self, x: mx.array) -> np.ndarray:
        if x.dtype in (mx.bfloat16, mx.float16):
            x = x.astype(mx.float32)
        return np.array(x)

    def zeros(self, shape: Sequence[int], dtype: str = "float32") -> mx.array:
        return mx.zeros(tuple(shape), dtype=getattr(mx, dtype))

    def astype(self, x: mx.array, dtype: Any) -> mx.array:
        return x.astype(dtype.dtype if isinstance(dtype, mx.array) else getattr(mx, dtype))

    def dtype_name(self, x: mx.array) -> str:
        return str(x.dtype).removeprefix("mlx.core.")

    sigmoid = staticmethod(mx.sigmoid)
    tanh = staticmethod(mx.tanh)
    exp = staticmethod(mx.exp)
    sqrt = staticmethod(mx.sqrt)
    abs = staticmethod(mx.abs)
    swapaxes = staticmethod(mx.swapaxes)
    expand_dims = staticmethod(mx.expand_dims)

    def argsort(self, x: mx.array, axis: int = -1) -> mx.array:
        return mx.argsort(x, axis=axis)

    def cumsum(self, x: mx.array, axis: int = -1) -> mx.array:
        return mx.cumsum(x, axis=axis)

    def maximum(self, x: mx.array, y: Any) -> mx.array:
        return mx.maximum(x, y)

    def where(self, cond: mx.array, x: Any, y: Any) -> mx.array:
        return mx.where(cond, x, y)

    def softmax(self, x: mx.array, axis: int = -1) -> mx.array:
        return mx.softmax(x, axis=axis, precise=True)

    def log_softmax(self, x: mx.array, axis: int = -1) -> mx.array:
        return x - mx.logsumexp(x, axis=axis, keepdims=True)

    def sum(self, x: mx.array, axis: int | None = None, keepdims: bool = False) -> mx.array:
        return mx.sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x: mx.array, axis: int | None = None, keepdims: bool = False) -> mx.array:
        return mx.mean(x, axis=axis, keepdims=keepdims)

    def norm(self, x: mx.array, axis: int = -1, keepdims: bool = False) -> mx.array:
        return mx.sqrt(mx.sum(x * x, axis=axis, keepdims=keepdims))

    def concat(self, xs: Sequence[mx.array], axis: int = 0) -> mx.array:
        return mx.concatenate(list(xs), axis=axis)

    def stack(self, xs: Sequence[mx.array], axis: int = 0) -> mx.array:
        return mx.stack(list(xs), axis=axis)

    def take(self, x: mx.array, indices: mx.array, axis: int = 0) -> mx.array:
        return mx.take(x, indices.astype(mx.int32), axis=axis)

    def cross_entropy(self, logits: mx.array, targets: mx.array) -> mx.array:
        return nn.losses.cross_entropy(logits.astype(mx.float32), targets.astype(mx.int32), reduction="none")

    def value_and_grad(self, fn: Callable[[Params], mx.array], params: Params) -> tuple[Any, Params]:
        loss, grads = mx.value_and_grad(fn)(dict(params))
        mx.eval(loss, grads)
        return loss, grads

    def stop_gradient(self, x: mx.array) -> mx.array:
        return mx.stop_gradient(x)

    def evaluate(self, *xs: Any) -> None:
        mx.eval(*xs)


PLAIN_STACKS = ("llama", "mistral", "qwen2", "qwen3")


class MlxBackend(Backend):
    name = "mlx_lm"
    supports_beam = False

    def __init__(self, model_path: Path, model_id: str, *, local_files_only: bool = True) -> None:
        super().__init__()
        from mlx_lm.utils import load_model

        # mlx >= 0.31 binds its default streams to the thread that made them: a lazy array built on
        # the chat thread fails to evaluate on the update thread ("There is no Stream(cpu, 0) in
        # current thread"). One stream usable from any thread, made the default on both, fixes
        # that; the engine never runs the two threads' mlx work at the same time.
        self._stream = mx.new_thread_unsafe_stream(mx.default_device())
        mx.set_default_stream(self._stream)
        try:
            self.model, config = load_model(Path(model_path))
        except (ValueError, KeyError) as exc:
            raise BackendError(f"mlx_lm cannot load {model_path}: {exc}") from None
        tokenizer = load_tokenizer(Path(model_path), local_files_only=local_files_only)
        text_cfg = config.get("text_config", config)
        self.model_id, self.model_path = model_id, Path(model_path)
        self.precision = str(mx.default_device())
        self.hidden_size = int(text_cfg["hidden_size"])
        self.layer_path, self.layers = find_layers(self.model, int(text_cfg["num_hidden_layers"]))
        self.num_layers = len(self.layers)
        # `forward_after_hook` runs the layers above the hook itself where the model is a plain stack of
        # full-attention blocks under `model.model` (mlx_lm's llama, mistral, qwen2, qwen3)
        inner = getattr(self.model, "model", None)
        self._stackable = (config.get("model_type") in PLAIN_STACKS and self.layer_path == "model.layers"
                           and hasattr(inner, "norm") and hasattr(inner, "embed_tokens")
                           and not any(getattr(layer, "use_sliding", False) for layer in self.layers))
        self.context_length = int(text_cfg.get("max_position_embeddings") or 2048)
        eos = config.get("eos_token_id") or []
        self.formatter = ChatFormatter(tokenizer, eos if isinstance(eos, list) else [eos])
        self.ops = MlxOps()
        self._hooked: tuple[Any, type] | None = None
        self._keep: mx.array | None = None
        self._slice_inner_output()

    def _slice_inner_output(self) -> None:
        """Make the inner model return only the positions in `self._keep`, so the output head
        (a [d, vocab] matmul) runs on those rows only; norms and heads are per position."""
        inner = getattr(self.model, "model", None)
        if inner is None or not callable(inner):
            return
        original = type(inner)
        backend = self

        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
            h = original.__call__(self, *args, **kwargs)
            return h if backend._keep is None else h[:, backend._keep]

        inner.__class__ = type(f"Sliced{original.__name__}", (original,), {"__call__": __call__})

    def prepare_thread(self) -> None:
        mx.set_default_stream(self._stream)

    def release_thread(self) -> None:
        # mlx 0.32 no longer cleans its streams up at exit by itself: a thread (the main one too)
        # that ends without this can abort the process ("terminate called without an active exception").
        mx.synchronize()
        mx.clear_streams()

    # --- hook ------------------------------------------------------------------------
    def install_hook(self, layer: int, hook: HookFn) -> None:
        self.remove_hook()
        target = self.layers[layer]
        original = type(target)
        backend = self

        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
            out = original.__call__(self, *args, **kwargs)
            if backend._bypass_hook:
                return out
            if isinstance(out, tuple):
                return (hook(out[0], backend.hook_context), *out[1:])
            return hook(out, backend.hook_context)

        target.__class__ = type(f"Hooked{original.__name__}", (original,), {"__call__": __call__})
        self._hooked = (target, original)
        self.installed_hook, self._hook_layer = hook, layer

    def remove_hook(self) -> None:
        if self._hooked is not None:
            target, original = self._hooked
            target.__class__ = original
            self._hooked = None
        self._memory_detached()

    # --- cache -------------------------------------------------------------------------
    def new_cache(self) -> list[Any]:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def cache_length(self, cache: list[Any]) -> int:
        return int(cache[0].offset) if cache else 0

    def cache_view(self, cache: list[Any], n: int) -> list[Any] | None:
        from mlx_lm.models.cache import KVCache

        view = []
        for c in cache:
            if type(c) is not KVCache or c.offset < n:
                return None
            v = KVCache()
            if n > 0:
                # Exact-size slices: the next update concatenates, so the source buffer is never written.
                v.keys, v.values = c.keys[..., :n, :], c.values[..., :n, :]
                v.offset = n
            view.append(v)
        return view

    def truncate_cache(self, cache: list[Any], n: int) -> bool:
        if not all(c.is_trimmable() for c in cache):
            return False
        for c in cache:
            c.trim(c.offset - n)
        return all(c.offset == n for c in cache)

    # --- forward -------------------------------------------------------------------------
    def _forward(self, ids: Sequence[int], cache: Any, grad: bool, keep: Sequence[int] | None) -> mx.array:
        if not ids:
            raise BackendError("forward needs at least one token")
        self._keep = None if keep is None else mx.array(list(keep), dtype=mx.int32)
        extra = self.extra_kv
        try:
            if extra is None:
                logits = self.model(mx.array([list(ids)]), cache=cache)[0].astype(mx.float32)
            else:
                plan = AttentionPlan(inject=extra.layers, visible_from=extra.visible_from)
                with mlx_layer_scope(self.layers, plan):
                    logits = self.model(mx.array([list(ids)]), cache=cache)[0].astype(mx.float32)
        finally:
            self._keep = None
        if not grad:
            mx.eval(logits)
        return logits

    def _forward_above(self, hidden: mx.array, hook: HookFn, grad: bool, keep: Sequence[int] | None) -> mx.array | None:
        if not self._stackable:
            return None
        inner = self.model.model
        h = hook(hidden)
        mask = "causal" if h.shape[1] > 1 else None  # what mlx_lm's create_attention_mask gives without a cache
        for layer in self.layers[self._hook_layer + 1:]:
            h = layer(h, mask, None)
        if keep is not None:
            h = h[:, mx.array(list(keep), dtype=mx.int32)]
        h = inner.norm(h)
        head = getattr(self.model, "lm_head", None)  # mlx_lm makes one only for untied embeddings
        logits = (inner.embed_tokens.as_linear(h) if head is None else head(h))[0].astype(mx.float32)
        if not grad:
            mx.eval(logits)
        return logits

    def _repeat_rows(self, cache: list[Any], n: int) -> None:
        for c in cache:
            c.keys, c.values = mx.repeat(c.keys, n, axis=0), mx.repeat(c.values, n, axis=0)

    def _step_rows(self, tokens: Sequence[int], cache: list[Any]) -> np.ndarray:
        logits = self.model(mx.array([[t] for t in tokens]), cache=cache)[:, -1].astype(mx.float32)
        return np.array(logits)

    def _compute_prefix(self, ids: list[int]) -> FrozenPrefix | bool:
        plan = AttentionPlan(hidden_layers=frozenset(range(self.num_layers)))
        cache = self.new_cache()
        self._bypass_hook = True
        try:
            with mlx_layer_scope(self.layers, plan):
                logits = self.model(mx.array([ids]), cache=cache)[0].astype(mx.float32)
        finally:
            self._bypass_hook = False
        if self.cache_view(cache, len(ids)) is None:  # rotating (sliding-window) caches are not copied
            return False
        mx.eval(plan.captured.hidden)
        logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float32)
        return FrozenPrefix(list(ids), cache, dict(plan.captured.hidden), logprobs)

    def token_logprobs(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        rows, shared = check_logprob_batch(batch)
        width = max(len(r) for r in rows) - shared
        tails = mx.array([r[shared:] + [0] * (width - len(r) + shared) for r in rows])  # right padding: no mask
        cache, prefix = self._start(rows[0][:shared])  # a prefix is shorter than what the rows share
        heads = [] if prefix is None else [prefix.logprobs]
        done = 0 if prefix is None else len(prefix.ids)
        self._bypass_hook = True
        try:
            if shared:  # the rows' common prefix runs once; its keys/values are shared by every row
                head = self.model(mx.array([rows[0][done:shared]]), cache=cache)[0].astype(mx.float32)
                heads.append(np.array(head - mx.logsumexp(head, axis=-1, keepdims=True), dtype=np.float32))
                for c in cache:
                    c.keys, c.values = mx.repeat(c.keys, len(rows), axis=0), mx.repeat(c.values, len(rows), axis=0)
            logits = self.model(tails, cache=cache).astype(mx.float32)
        finally:
            self._bypass_hook = False
        logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = np.array(mx.take_along_axis(logits[:, :-1], tails[:, 1:, None], axis=2)[..., 0], dtype=np.float32)
        return join_logprobs(rows, shared, np.concatenate(heads) if heads else None, picked)

    def capture(self, ids: Sequence[int], *, hidden_layers: Sequence[int] = (),
                kv_layers: Sequence[int] = (), shift: int = 0) -> Captured:
        if not ids:
            raise BackendError("capture needs at least one token")
        plan = AttentionPlan(capture_kv=frozenset(kv_layers), hidden_layers=frozenset(hidden_layers),
                             stop_after_hidden=not kv_layers)
        cache, prefix = self._start(ids, shift)
        skip = 0 if prefix is None else len(prefix.ids)
        self._keep = mx.array([len(ids) - skip - 1], dtype=mx.int32)
        self._bypass_hook = True
        try:
            with mlx_layer_scope(self.layers, plan):
                out = self.model(mx.array([list(ids[skip:])]), cache=cache)
            del out  # only the captures are wanted; nothing after them is evaluated
        except StopForward:
            pass
        finally:
            self._bypass_hook = False
            self._keep = None
        captured = plan.captured
        if prefix is not None:  # the caller sees every position, the system prompt's included
            captured.hidden = {i: mx.concatenate([prefix.hidden[i], h]) for i, h in captured.hidden.items()}
            kept = prefix.cache
            captured.kv = {i: (mx.concatenate([kept[i].keys[..., :skip, :], k], axis=2),
                               mx.concatenate([kept[i].values[..., :skip, :], v], axis=2))
                           for i, (k, v) in captured.kv.items()}
        if shift:
            captured.kv = {i: (self._shift_keys(i, k, shift), v) for i, (k, v) in captured.kv.items()}
        mx.eval(captured.hidden, captured.kv)
        return captured

    def _shift_keys(self, layer: int, keys: mx.array, shift: int) -> mx.array:
        """Rotate RoPE-applied keys [1, H, L, D] by `shift` positions with the layer's own RoPE: each
        token as its own one-token sequence at offset `shift` (rotations add up)."""
        rope = self.layers[layer].self_attn.rope
        return rope(keys.transpose(2, 1, 0, 3), offset=shift).transpose(2, 1, 0, 3)
