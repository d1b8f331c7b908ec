"""Attention-level memory plumbing: extra keys/values read by some layers, and read-only captures.

Owns the two small mechanisms that implement what a memory module asks of the attention
layers (`lmm.types.ExtraKV`: RoPE-applied keys/values prepended to the attention of some
layers; `lmm.types.Captured`: hidden states and keys/values of the frozen model):

* torch: a wrapper registered with transformers' `AttentionInterface` around the model's own
  attention function (sdpa or eager). With no plan for the calling thread, or no extra
  keys/values for the calling layer (`module.layer_idx`), it calls the original function with
  the original arguments, so the base path is bit-identical. Otherwise it prepends the keys
  and values and widens the mask explicitly (sdpa's `is_causal` is top-left aligned when
  q_len != kv_len, so it is never relied on).
* mlx_lm: for the duration of one forward, the decoder layers that need it get a per-instance
  subclass whose `__call__` swaps the layer's cache for a proxy (its `update_and_fetch`
  records the new keys/values and returns the extra ones prepended) and pads the mask. mlx_lm
  builds one mask for all layers from the first layer's cache, so the cache objects themselves
  never hold the extras. mlx's "causal" string mask is bottom-right aligned, so prepended
  columns are visible to every query; explicit array masks are padded.

Visibility: the extra keys/values are seen by the queries at absolute positions >=
`ExtraKV.visible_from` (the chat after the system prompt); positions are never shifted.

It owns no memory logic (which keys/values, when) -- that is the memory module's business.
torch and mlx are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lmm.types import Captured


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside a forward once everything asked for is captured."""


@dataclass
class AttentionPlan:
    """One forward's instructions to the attention wrappers."""

    inject: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    visible_from: int = 0
    offset: int | None = 0  # absolute position of the forward's first token (None: kv length - q length)
    capture_kv: frozenset[int] = frozenset()
    hidden_layers: frozenset[int] = frozenset()
    stop_after_hidden: bool = False  # stop once the deepest of hidden_layers is captured
    captured: Captured = field(default_factory=Captured)


_LOCAL = threading.local()


def current_plan() -> AttentionPlan | None:
    return getattr(_LOCAL, "plan", None)


@contextmanager
def plan_scope(plan: AttentionPlan | None) -> Iterator[AttentionPlan | None]:
    previous = current_plan()
    _LOCAL.plan = plan
    try:
        yield plan
    finally:
        _LOCAL.plan = previous


# --- torch ----------------------------------------------------------------------------------------

_TORCH_PREFIX = "lmm_kv_"


def enable_torch_attention(model: Any) -> None:
    """Route `model`'s attention through the plan-aware wrapper (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation
    if impl.startswith(_TORCH_PREFIX):
        return
    if impl not in ("sdpa", "eager"):
        raise RuntimeError(f"attention memory supports sdpa and eager attention, not {impl!r}")
    name = _TORCH_PREFIX + impl
    if name not in ALL_ATTENTION_FUNCTIONS:
        original = ALL_ATTENTION_FUNCTIONS["sdpa"] if impl == "sdpa" else None
        AttentionInterface.register(name, _torch_wrapper(original))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    model.set_attn_implementation(name)


def _torch_wrapper(original: Any) -> Any:
    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any,
                  **kwargs: Any) -> Any:
        base = original
        if base is None:  # eager: each model family has its own module-level function
            import sys

            base = sys.modules[type(module).__module__].eager_attention_forward
        plan = current_plan()
        if plan is None:
            return base(module, query, key, value, attention_mask, *args, **kwargs)
        layer = getattr(module, "layer_idx", None)
        if layer in plan.capture_kv:
            t = query.shape[2]
            plan.captured.kv[layer] = (key[:, :, -t:].detach().clone(), value[:, :, -t:].detach().clone())
        extra = plan.inject.get(layer)
        if extra is None:
            return base(module, query, key, value, attention_mask, *args, **kwargs)
        key, value, attention_mask = torch_prepend(query, key, value, attention_mask, extra, plan)
        kwargs.pop("is_causal", None)
        return base(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def torch_prepend(query: Any, key: Any, value: Any, mask: Any, extra: tuple[Any, Any],
                  plan: AttentionPlan) -> tuple[Any, Any, Any]:
    """`key`/`value` with `extra` prepended and the mask widened to match: the extra columns are
    visible to queries at positions >= `plan.visible_from` (used by transformers' wrapper and by
    `torch_llama`'s own attention)."""
    import torch

    ek, ev = extra
    ek, ev = ek.to(device=key.device, dtype=key.dtype), ev.to(device=value.device, dtype=value.dtype)
    if key.shape[0] != ek.shape[0]:  # beams
        ek, ev = ek.expand(key.shape[0], -1, -1, -1), ev.expand(value.shape[0], -1, -1, -1)
    q_len, kv_len, n_extra = query.shape[2], key.shape[2], ek.shape[2]
    offset = kv_len - q_len if plan.offset is None else plan.offset
    rows = torch.arange(offset, offset + q_len, device=key.device)
    visible = rows >= plan.visible_from  # [q]
    key, value = torch.cat([ek, key], dim=2), torch.cat([ev, value], dim=2)
    if mask is None and q_len == 1 and bool(visible.all()):
        return key, value, None  # one query that sees everything: no mask needed
    if mask is None:
        j = torch.arange(kv_len, device=key.device)
        real = (j[None, :] <= (kv_len - q_len) + torch.arange(q_len, device=key.device)[:, None])[None, None]
    else:
        real = mask[..., :kv_len]
    cols = visible[:, None].expand(q_len, n_extra)
    cols = cols.expand(*real.shape[:-2], q_len, n_extra)
    if real.dtype != torch.bool:  # an additive float mask
        cols = torch.where(cols, 0.0, torch.finfo(real.dtype).min).to(real.dtype)
    return key, value, torch.cat([cols, real], dim=-1)


# --- mlx --------------------------------------------------------------------------------------------

class _MlxCacheProxy:
    """Stands in for one layer's cache during one forward: records and/or prepends keys/values."""

    def __init__(self, cache: Any, layer: int, plan: AttentionPlan) -> None:
        self._cache, self._layer, self._plan = cache, layer, plan

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        import mlx.core as mx

        plan, layer = self._plan, self._layer
        if layer in plan.capture_kv:
            plan.captured.kv[layer] = (keys, values)
        k, v = self._cache.update_and_fetch(keys, values)
        extra = plan.inject.get(layer)
        if extra is not None:
            ek, ev = extra
            k = mx.concatenate([ek.astype(k.dtype), k], axis=2)
            v = mx.concatenate([ev.astype(v.dtype), v], axis=2)
        return k, v


def _mlx_pad_mask(mask: Any, offset: int, n_queries: int, n_real: int, n_extra: int, visible_from: int) -> Any:
    import mlx.core as mx

    visible = mx.arange(offset, offset + n_queries) >= visible_from
    all_visible = offset >= visible_from
    if (mask is None or isinstance(mask, str)) and all_visible:
        return mask  # None (one query) or bottom-right "causal": the prepended columns are visible
    if mask is None:
        real = mx.ones((n_queries, n_real), dtype=mx.bool_)
    elif isinstance(mask, str):
        j = mx.arange(n_real)[None, :]
        real = j <= (n_real - n_queries) + mx.arange(n_queries)[:, None]
    else:
        real = mask
    if real.ndim == 1:  # a one-query mask over the keys
        cols = mx.broadcast_to(visible[-1:], (n_extra,))
    else:
        cols = mx.broadcast_to(visible[:, None], (*real.shape[:-1], n_extra))
    if real.dtype != mx.bool_:
        cols = mx.where(cols, mx.array(0.0, dtype=real.dtype), mx.array(mx.finfo(real.dtype).min, dtype=real.dtype))
    return mx.concatenate([cols, real], axis=-1)


_MLX_CLASSES: dict[type, type] = {}


def _mlx_layer_class(original: type) -> type:
    cls = _MLX_CLASSES.get(original)
    if cls is not None:
        return cls

    def __call__(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
        plan = current_plan()
        index = None if plan is None else getattr(_LOCAL, "mlx_index", {}).get(id(self))
        if plan is None or index is None:
            return original.__call__(self, x, *args, **kwargs)
        if index in plan.hidden_layers:
            plan.captured.hidden[index] = x[0]
            if plan.stop_after_hidden and index == max(plan.hidden_layers):
                raise StopForward
        args = list(args)
        has_mask_arg, has_cache_arg = len(args) > 0, len(args) > 1
        mask = args[0] if has_mask_arg else kwargs.get("mask")
        cache = args[1] if has_cache_arg else kwargs.get("cache")
        if cache is not None and (index in plan.capture_kv or index in plan.inject):
            extra = plan.inject.get(index)
            if extra is not None:
                offset = int(cache.offset)  # the cache's length before this forward
                n_real = offset + x.shape[1] if not hasattr(mask, "shape") else mask.shape[-1]
                mask = _mlx_pad_mask(mask, offset, x.shape[1], n_real, extra[0].shape[2], plan.visible_from)
            cache = _MlxCacheProxy(cache, index, plan)
        if has_mask_arg:
            args[0] = mask
        elif "mask" in kwargs:
            kwargs["mask"] = mask
        if has_cache_arg:
            args[1] = cache
        else:
            kwargs["cache"] = cache
        return original.__call__(self, x, *args, **kwargs)

    cls = type(f"KV{original.__name__}", (original,), {"__call__": __call__})
    _MLX_CLASSES[original] = cls
    return cls


@contextmanager
def mlx_layer_scope(layers: Any, plan: AttentionPlan) -> Iterator[AttentionPlan]:
    """Within the scope, the layers `plan` involves read it on this thread; classes restored after."""
    wanted = set(plan.inject) | set(plan.capture_kv)
    wanted |= plan.hidden_layers
    swapped: list[tuple[Any, type]] = []
    previous_index = getattr(_LOCAL, "mlx_index", None)
    _LOCAL.mlx_index = {id(layers[i]): i for i in wanted}
    try:
        for i in sorted(wanted):
            layer = layers[i]
            original = type(layer)
            layer.__class__ = _mlx_layer_class(original)
            swapped.append((layer, original))
        with plan_scope(plan):
            yield plan
    finally:
        for layer, original in swapped:
            layer.__class__ = original
        _LOCAL.mlx_index = previous_index
