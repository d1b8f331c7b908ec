"""`chaptered_bank`: a slot memory in chapters, read by cross-attention after top-k routing.

Owns a bank of N slots (keys and values of width d_mem) grouped in C chapters of S = N / C
slots, a router (one key per chapter, [C, d]) and a zero-initialised output projection, so
a fresh bank is exactly the identity. Each position reads the slots of its k selected
chapters: one softmax over those k * S slots plus a null slot (logit `null_logit`, value 0),
each slot's logit being the scaled dot product q . k / sqrt(d_mem) plus its chapter's router
score (so the router keys get a gradient even with k = 1). With the null slot ahead, an
untrained bank reads little, and a key must be learned to be read: unrelated prompts are left
nearly alone. The output is `x + rms(x) * (read @ W_o) / sqrt(d_mem)`: the correction is
relative to the hidden state's scale and an Adam step changes it by about lr whatever the
width, so one learning rate fits models of different sizes.

Routing compares `mean(unit(x)) - center` with the router keys (cosine), and the slot queries
are `unit(x) - center` rescaled to unit RMS. `center` is the
running mean of the unit hidden states of every position the chat has processed (a saved
buffer): without it, messages of a real model share one dominant direction and all route
to the same chapter (cosine ~0.9 between unrelated messages in SmolLM2's middle layer).
`routing` picks what is pooled in the generate phase: "sequence" (every position of the
session so far, kept as cumulative sums in the transient buffer `route_cum`, cut back to
`ctx.offset` when the backend reuses a shorter cache prefix), "rolling" (the last `window`
positions) or "token" (each position alone). Score and train passes pool over their own
positions only (the message being learned), so they route like the update does, and never
advance session buffers.

An update routes the message by the mean of `batch.hidden` (as its score pass routes, so the
loss after the update is measured on the chapters trained) and trains only those chapters'
slots and router keys (as per-chapter entries `ch{c}.keys`, ..., so the optimizer moments
stay with their chapter) plus the shared W_o; `commit` writes them back. Other chapters' slots
are untouched, but W_o is shared by all chapters and remains a path by which updates interfere.
Measured limit (SmolLM2-135M, 20 messages): the chat-template tokens every message shares made
15 of 20 updates route to one chapter.

Options: `low_rank` r > 0 stores each chapter's values as A_c B_c^T ([S, r] x [d_mem, r]).
`storage_bits` 8 stores every float matrix of the state file as per-row absmax int8 (scale
= max|row| / 127 kept as float32): each entry is off by at most half a step, max|row| / 254,
i.e. <= 0.4 % of its row's largest entry; the running module keeps float32 until reloaded.
Chapter usage (positions routed at inference, updates per chapter) is saved and reported.
With `--consolidate`, each statement gets a gated chapter of its own instead (`fact_*` options,
`lmm.memory.fact_gate`). It owns no token selection (`lmm.memory.base`) and no model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lmm.memory.base import GradientMemory, LearnBatch, MemoryModule, RewriteContext, StateError
from lmm.memory.fact_gate import FactGate, FactGateConfig
from lmm.memory.registry import register
from lmm.ops import Array, Ops, Params

ROUTINGS = ("sequence", "rolling", "token")
EPS = 1e-6


@dataclass
class ChapteredBankConfig(FactGateConfig):
    lr: float = 1e-2
    steps: int = 3
    num_slots: int = 64
    num_chapters: int = 8
    top_k: int = 1
    d_mem: int = 0  # 0: the model's hidden size, no input projection
    routing: str = "sequence"
    window: int = 32
    low_rank: int = 0
    storage_bits: int = 32
    router_scale: float = 4.0
    null_logit: float = 4.0
    fact_slots: int = 4  # slots of each consolidated statement's chapter
    fact_scale: float = 8.0  # what a fact chapter adds, relative to the hidden state's scale

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_chapters < 1:
            raise ValueError(f"num_chapters must be >= 1, got {self.num_chapters}")
        if self.num_slots < self.num_chapters or self.num_slots % self.num_chapters:
            raise ValueError(f"num_slots must be a positive multiple of num_chapters ({self.num_chapters}), "
                             f"got {self.num_slots}")
        if not 1 <= self.top_k <= self.num_chapters:
            raise ValueError(f"top_k must be in [1, num_chapters={self.num_chapters}], got {self.top_k}")
        if self.d_mem < 0:
            raise ValueError(f"d_mem must be >= 0 (0: hidden size), got {self.d_mem}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}; got {self.routing!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        slots = self.num_slots // self.num_chapters
        if not 0 <= self.low_rank < slots:
            raise ValueError(f"low_rank must be in [0, slots per chapter={slots}), got {self.low_rank}")
        if self.storage_bits not in (32, 8):
            raise ValueError(f"storage_bits must be 32 or 8, got {self.storage_bits}")
        if not self.router_scale >= 0:
            raise ValueError(f"router_scale must be >= 0, got {self.router_scale}")
        if not np.isfinite(self.null_logit):
            raise ValueError(f"null_logit must be finite, got {self.null_logit}")
        if self.fact_slots < 1:
            raise ValueError(f"fact_slots must be >= 1, got {self.fact_slots}")
        if not self.fact_scale > 0:
            raise ValueError(f"fact_scale must be > 0, got {self.fact_scale}")


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (last axis) absmax int8: returns (int8 values, float32 scales of shape [..., 1])."""
    scale = np.abs(x).max(axis=-1, keepdims=True).astype(np.float32) / 127.0
    q = np.round(x / np.where(scale > 0, scale, 1.0))
    return np.clip(q, -127, 127).astype(np.int8), scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)


@register
class ChapteredBank(FactGate, GradientMemory):
    name = "chaptered_bank"
    config_cls = ChapteredBankConfig
    transient_buffers = ("route_cum",)
    chapter_fields: tuple[str, ...]
    fact_fields = ("keys", "values")

    def __init__(self, config: ChapteredBankConfig, *, hidden_size: int, ops: Ops, seed: int) -> None:
        super().__init__(config, hidden_size=hidden_size, ops=ops, seed=seed)
        if config.d_mem > hidden_size:
            raise ValueError(f"d_mem must be <= hidden size {hidden_size}, got {config.d_mem}")
        self.cfg = config
        c, d = config.num_chapters, hidden_size
        self.slots = config.num_slots // c
        self.dm = config.d_mem or d
        rng = np.random.default_rng(seed)
        f32 = np.float32
        self.params = {"keys": ops.asarray(rng.normal(size=(c, self.slots, self.dm)).astype(f32))}
        if config.low_rank:
            r = config.low_rank
            self.params["val_a"] = ops.asarray(rng.normal(size=(c, self.slots, r)).astype(f32))
            self.params["val_b"] = ops.asarray(rng.normal(0, r**-0.5, size=(c, self.dm, r)).astype(f32))
            self.chapter_fields = ("keys", "val_a", "val_b", "router")
        else:
            self.params["values"] = ops.asarray(rng.normal(size=(c, self.slots, self.dm)).astype(f32))
            self.chapter_fields = ("keys", "values", "router")
        router = rng.normal(size=(c, d))
        self.params["router"] = ops.asarray((router / np.linalg.norm(router, axis=1, keepdims=True)).astype(f32))
        self.params["w_out"] = ops.zeros((self.dm, d))
        if self.dm < d:  # a fixed random projection (saved, so a load never depends on the seed)
            self.buffers["w_in"] = ops.asarray(rng.normal(0, d**-0.5, size=(d, self.dm)).astype(f32))
        self.buffers["center"] = ops.zeros((d,))
        self.buffers["center_count"] = ops.zeros((1,))
        self.buffers["usage_infer"] = ops.zeros((c,))
        self.buffers["usage_update"] = ops.zeros((c,))
        self._train_chapters: list[int] | None = None
        self._loading_plain = False
        self.init_facts()

    # --- fact chapters (`--consolidate`: one per statement, opened by its gate, `lmm.memory.fact_gate`) ---
    def seed_trained(self) -> bool:
        return bool(np.any(self.ops.to_numpy(self.params["w_out"])))

    def new_fact(self, i: int, rng: np.random.Generator) -> Params:
        """A chapter of `fact_slots` slots; its values start at zero, so it changes nothing untrained."""
        keys = rng.normal(size=(self.cfg.fact_slots, self.hidden_size)).astype(np.float32)
        return {f"fact{i}.keys": self.ops.asarray(keys), f"fact{i}.values": self.ops.zeros(keys.shape)}

    def _fact_read(self, x: Array, rms: Array, ctx: RewriteContext) -> Array | None:
        """What the open fact chapters add to hidden states `x` [B, T, d] (None: none open)."""
        chapters = self.facts_read(ctx)
        if not chapters:
            return None
        ops, p, d = self.ops, self.p, self.hidden_size
        q = x - self.buffers["fact_center"]
        q = q * (float(np.sqrt(d)) / (ops.norm(q, axis=-1, keepdims=True) + EPS))
        b, t, _ = x.shape
        total = None
        for i in chapters:
            logits = q @ ops.swapaxes(p[f"fact{i}.keys"], 0, 1) / float(np.sqrt(d))  # [B, T, S]
            attn = ops.softmax(ops.concat([logits, ops.zeros((b, t, 1))], axis=-1), axis=-1)[..., :-1]
            read = rms * (attn @ p[f"fact{i}.values"]) * self.cfg.fact_scale
            total = read if total is None else total + read
        return total

    # --- routing ---------------------------------------------------------------------------
    def _pooled(self, u: Array, ctx: RewriteContext) -> tuple[Array, Array | None]:
        """Routing vectors [B, T', d] (T' = 1 for sequence pooling) and the new `route_cum` (generate)."""
        ops, cfg = self.ops, self.cfg
        b, t, d = u.shape
        if cfg.routing == "token":
            return u, None
        prev = None
        if ctx.phase == "generate":
            hist = self.buffers.get("route_cum")
            if hist is not None and hist.shape[1] >= ctx.offset + 1 and hist.shape[0] == b:
                prev = hist[:, : ctx.offset + 1]
        if prev is None:  # no session history (score/train, or a cache this module did not see)
            prev = ops.zeros((b, 1, d))
        start = prev.shape[1] - 1
        full = ops.concat([prev, prev[:, -1:] + ops.cumsum(u, axis=1)], axis=1)
        new_hist = full if ctx.phase == "generate" else None
        if cfg.routing == "sequence":
            return full[:, -1:] / float(start + t), new_hist
        end = np.arange(start + 1, start + t + 1)
        begin = np.maximum(end - cfg.window, 0)
        width = ops.asarray((end - begin).astype(np.float32)).reshape(1, t, 1)
        hi = ops.take(full, ops.asarray(end, dtype="int32"), axis=1)
        lo = ops.take(full, ops.asarray(begin, dtype="int32"), axis=1)
        return (hi - lo) / width, new_hist

    def _direction(self, pooled: Array) -> Array:
        v = pooled - self.buffers["center"]
        return v / (self.ops.norm(v, axis=-1, keepdims=True) + EPS)

    def _unit_router(self, router: Array) -> Array:
        return router / (self.ops.norm(router, axis=-1, keepdims=True) + EPS)

    def _select(self, direction: Array) -> Array:
        """Top-k chapter indices [..., k] for routing directions [..., d]."""
        scores = direction @ self.ops.swapaxes(self._unit_router(self.params["router"]), 0, 1)
        return self.ops.argsort(-scores, axis=-1)[..., : self.cfg.top_k]

    # --- rewrite ---------------------------------------------------------------------------
    def _values(self, p: Params, prefix: str = "") -> Array:
        if self.cfg.low_rank:
            return p[prefix + "val_a"] @ self.ops.swapaxes(p[prefix + "val_b"], -1, -2)
        return p[prefix + "values"]

    def rewrite(self, hidden: Array, ctx: RewriteContext) -> Array:
        ops, cfg, p = self.ops, self.cfg, self.p
        x = ops.astype(hidden, "float32")
        b, t, d = x.shape
        k, s = cfg.top_k, self.slots
        rms = ops.sqrt(ops.mean(x * x, axis=-1, keepdims=True) + EPS)
        xn = x / rms
        u = xn / float(np.sqrt(d))  # unit vectors: routing ignores each position's scale
        pooled, new_hist = self._pooled(u, ctx)
        direction = self._direction(pooled)  # [B, T', d]
        tp = direction.shape[1]
        forced = self._train_chapters if ctx.phase == "train" else None
        if forced is not None and f"ch{forced[0]}.keys" in p:
            keys = ops.stack([p[f"ch{c}.keys"] for c in forced]).reshape(1, 1, k * s, self.dm)
            vals = ops.stack([self._values(p, f"ch{c}.") for c in forced]).reshape(1, 1, k * s, self.dm)
            router = ops.stack([p[f"ch{c}.router"] for c in forced])  # [k, d]
            score = direction @ ops.swapaxes(self._unit_router(router), 0, 1)  # [B, T', k]
            sel = None
        else:
            sel = self._select(ops.stop_gradient(direction))  # [B, T', k]
            keys = ops.take(p["keys"], sel, axis=0).reshape(b, tp, k * s, self.dm)
            vals = ops.take(self._values(p), sel, axis=0).reshape(b, tp, k * s, self.dm)
            router = ops.take(self._unit_router(p["router"]), sel, axis=0)  # [B, T', k, d]
            score = ops.sum(ops.expand_dims(direction, 2) * router, axis=-1)
        bias = (ops.expand_dims(score * cfg.router_scale, -1) + ops.zeros((s,))).reshape(b, tp, 1, k * s)
        qc = u - self.buffers["center"]  # centred like the router, so keys match content, not the shared direction
        qc = qc * (float(np.sqrt(d)) / (ops.norm(qc, axis=-1, keepdims=True) + EPS))
        q = qc @ self.buffers["w_in"] if "w_in" in self.buffers else qc
        logits = (ops.expand_dims(q, 2) @ ops.swapaxes(keys, -1, -2)) / float(np.sqrt(self.dm)) + bias
        null = ops.zeros((b, t, 1, 1)) + cfg.null_logit
        attn = ops.softmax(ops.concat([logits, null], axis=-1), axis=-1)[..., : k * s]
        read = (attn @ vals).reshape(b, t, self.dm)
        out = x + rms * (read @ p["w_out"]) / float(np.sqrt(self.dm))
        facts = self._fact_read(x, rms, ctx)
        if facts is not None:
            out = out + facts
        if ctx.phase == "generate":
            self._advance(u, sel, new_hist, t)
        return ops.astype(out, hidden)

    def _advance(self, u: Array, sel: Array | None, new_hist: Array | None, t: int) -> None:
        """Generate phase only: session routing history, the centre, inference usage."""
        ops, buf = self.ops, self.buffers
        n = buf["center_count"]
        m = float(u.shape[0] * u.shape[1])
        buf["center"] = (buf["center"] * n + ops.sum(ops.sum(u, axis=0), axis=0)) / (n + m)
        buf["center_count"] = n + m
        if sel is not None:
            hits = ops.astype(ops.expand_dims(sel, -1) == ops.asarray(np.arange(self.cfg.num_chapters),
                                                                         dtype="int32"), "float32")
            per = ops.sum(ops.sum(ops.sum(hits, axis=0), axis=0), axis=0)
            buf["usage_infer"] = buf["usage_infer"] + per * float(t // sel.shape[1])
        if new_hist is not None:
            buf["route_cum"] = new_hist
        ops.evaluate(*[v for v in buf.values()])

    # --- learning ----------------------------------------------------------------------------
    def route_message(self, hidden: Array) -> list[int]:
        """The chapters an update of a message with hidden states [T, d] trains (top-k, best first)."""
        ops = self.ops
        x = ops.astype(hidden, "float32")
        u = x / (ops.norm(x, axis=-1, keepdims=True) + EPS)
        sel = self._select(self._direction(ops.mean(u, axis=0)))
        return [int(c) for c in ops.to_numpy(sel).reshape(-1)]

    def trainable(self, batch: LearnBatch) -> Params:
        if self._fact is not None:  # a statement's consolidation trains its own chapter only
            return self.fact_trainable()
        if batch.hidden is None:
            raise ValueError("chaptered_bank needs the message's hidden states (batch.hidden) to route")
        chapters = self.route_message(batch.hidden)
        self._train_chapters = chapters
        usage = self.ops.to_numpy(self.buffers["usage_update"])
        usage[chapters] += 1
        self.buffers["usage_update"] = self.ops.asarray(usage)
        out: Params = {"w_out": self.params["w_out"]}
        for c in chapters:
            for f in self.chapter_fields:
                out[f"ch{c}.{f}"] = self.params[f][c]
        return out

    def commit(self, params: Params, batch: LearnBatch) -> None:
        if self._fact is not None:
            self.params.update(params)
            self.ops.evaluate(self.params)
            return
        chapters = self._train_chapters or []
        for f in self.chapter_fields:
            full = self.params[f]
            rows = [params[f"ch{c}.{f}"] if c in chapters else full[c] for c in range(self.cfg.num_chapters)]
            self.params[f] = self.ops.stack(rows)
        self.params["w_out"] = params["w_out"]
        self._train_chapters = None
        self.ops.evaluate(self.params)

    def reset_session(self) -> None:
        self.buffers.pop("route_cum", None)

    def summary(self) -> dict[str, Any]:
        ops = self.ops
        return {
            "chapters": self.cfg.num_chapters, "slots_per_chapter": self.slots, "top_k": self.cfg.top_k,
            "routing": self.cfg.routing,
            "usage_inference": [int(v) for v in ops.to_numpy(self.buffers["usage_infer"])],
            "usage_update": [int(v) for v in ops.to_numpy(self.buffers["usage_update"])],
            "w_out_norm": float(np.linalg.norm(ops.to_numpy(self.params["w_out"]))),
            **self.fact_summary(),
        }

    # --- state ----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, np.ndarray]:
        plain = super().state_tensors()
        if self.cfg.storage_bits == 32 or self._loading_plain:
            return plain
        out: dict[str, np.ndarray] = {}
        for key, value in plain.items():
            if value.ndim >= 2 and value.dtype == np.float32:
                out[key + ".q8"], out[key + ".scale"] = quantize_rows(value)
            else:
                out[key] = value
        return out

    def load_module_state(self, tensors: dict[str, np.ndarray]) -> None:
        if self.cfg.storage_bits == 32:
            MemoryModule.load_state_tensors(self, tensors)
            return
        expected = set(self.state_tensors())
        missing = sorted(expected - set(tensors))
        if missing:
            raise StateError(f"state is missing tensor(s) {', '.join(missing)} for module {self.name}")
        plain: dict[str, np.ndarray] = {}
        for key, value in tensors.items():
            if key.endswith(".scale"):
                continue
            if key.endswith(".q8"):
                base = key.removesuffix(".q8")
                if base + ".scale" not in tensors:
                    raise StateError(f"tensor {key} has no {base}.scale in state for module {self.name}")
                plain[base] = dequantize_rows(value, tensors[base + ".scale"])
            else:
                plain[key] = value
        self._loading_plain = True
        try:
            MemoryModule.load_state_tensors(self, plain)
        finally:
            self._loading_plain = False

    def _after_load(self) -> None:
        self.buffers.pop("route_cum", None)
        self._train_chapters = None
