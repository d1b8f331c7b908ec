"""`lora_on_user`: a low-rank residual correction trained on the user's surprising tokens.

`h + h @ A @ B`, A [d, r] drawn from a seeded normal, B [r, d] zeros, so a fresh module
is the identity. After each user message a few optimizer steps on A and B lower the CE of
the message's high-CE tokens; the base model stays frozen.

With `--consolidate`, each statement gets a low-rank correction of its own instead, opened by its
fact gate (`lmm.memory.fact_gate`): `rms(h) * fact_scale * (ĥ @ A_i) @ B_i` with ĥ = h / rms(h),
A_i [d, fact_rank] a seeded normal of variance 1/d (so ĥ @ A_i has unit-scale entries), B_i zeros. The
scales make an Adam step change the output by about lr * fact_scale of the hidden state's RMS, whatever
the model's width or the layer's norm. One shared A, B trained by every statement reached unrelated
replies and the drift check undid every consolidation (0/32, docs/consolidation.md).

It owns no token selection (shared, in `lmm.memory.base`) and no model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lmm.memory.base import GradientMemory, LearnBatch, RewriteContext
from lmm.memory.fact_gate import FactGate, FactGateConfig
from lmm.memory.registry import register
from lmm.ops import Array, Ops, Params

EPS = 1e-6


@dataclass
class LoraConfig(FactGateConfig):
    rank: int = 8
    init_std: float = 0.02
    fact_rank: int = 4  # rank of each consolidated statement's correction
    # what a fact's correction adds, relative to the hidden state's RMS (dev: 8 recalled 3 of the first 6, 32 all 6)
    fact_scale: float = 32.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if self.fact_rank < 1:
            raise ValueError(f"fact_rank must be >= 1, got {self.fact_rank}")
        if not self.fact_scale > 0:
            raise ValueError(f"fact_scale must be > 0, got {self.fact_scale}")


@register
class LoraOnUser(FactGate, GradientMemory):
    name = "lora_on_user"
    config_cls = LoraConfig
    fact_fields = ("A", "B")

    def __init__(self, config: LoraConfig, *, hidden_size: int, ops: Ops, seed: int) -> None:
        super().__init__(config, hidden_size=hidden_size, ops=ops, seed=seed)
        self.cfg = config
        rng = np.random.default_rng(seed)
        a = rng.normal(0.0, config.init_std, size=(hidden_size, config.rank)).astype(np.float32)
        self.params = {"A": ops.asarray(a), "B": ops.zeros((config.rank, hidden_size))}
        self.init_facts()

    def rewrite(self, hidden: Array, ctx: RewriteContext) -> Array:
        ops, p = self.ops, self.p
        h = ops.astype(hidden, "float32")
        out = h + (h @ p["A"]) @ p["B"]
        facts = self.facts_read(ctx)
        if facts:
            rms = ops.sqrt(ops.mean(h * h, axis=-1, keepdims=True) + EPS)
            unit = h / rms
            for i in facts:
                out = out + rms * ((unit @ p[f"fact{i}.A"]) @ p[f"fact{i}.B"]) * self.cfg.fact_scale
        return ops.astype(out, hidden)

    def trainable(self, batch: LearnBatch) -> Params:
        if self._fact is not None:  # a statement's consolidation trains its own correction only
            return self.fact_trainable()
        return {"A": self.params["A"], "B": self.params["B"]}

    # --- consolidated facts (`lmm.memory.fact_gate`) -------------------------------------------
    def seed_trained(self) -> bool:
        return bool(np.any(self.ops.to_numpy(self.params["B"])))

    def new_fact(self, i: int, rng: np.random.Generator) -> Params:
        d, r = self.hidden_size, self.cfg.fact_rank
        a = rng.normal(0.0, d**-0.5, size=(d, r)).astype(np.float32)
        return {f"fact{i}.A": self.ops.asarray(a), f"fact{i}.B": self.ops.zeros((r, d))}

    def summary(self) -> dict[str, Any]:
        b = self.ops.to_numpy(self.params["B"])
        return {"B_norm": float(np.linalg.norm(b)), **self.fact_summary()}
