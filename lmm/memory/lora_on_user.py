"""`lora_on_user`: a low-rank residual correction trained on the user's surprising tokens.

`h + h @ A @ B`, A [d, r] drawn from a seeded normal, B [r, d] zeros, so a fresh module
is the identity. After each user message a few optimizer steps on A and B lower the CE of
the message's high-CE tokens; the base model stays frozen. It owns no token selection
(shared, in `lmm.memory.base`) and no model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmm.memory.base import GradientConfig, GradientMemory, RewriteContext
from lmm.memory.registry import register
from lmm.ops import Array, Ops


@dataclass
class LoraConfig(GradientConfig):
    rank: int = 8
    init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")


@register
class LoraOnUser(GradientMemory):
    name = "lora_on_user"
    config_cls = LoraConfig

    def __init__(self, config: LoraConfig, *, hidden_size: int, ops: Ops, seed: int) -> None:
        super().__init__(config, hidden_size=hidden_size, ops=ops, seed=seed)
        rng = np.random.default_rng(seed)
        a = rng.normal(0.0, config.init_std, size=(hidden_size, config.rank)).astype(np.float32)
        self.params = {"A": ops.asarray(a), "B": ops.zeros((config.rank, hidden_size))}

    def rewrite(self, hidden: Array, ctx: RewriteContext) -> Array:
        p = self.p
        h = self.ops.astype(hidden, "float32")
        return self.ops.astype(h + (h @ p["A"]) @ p["B"], hidden)

    def summary(self) -> dict[str, float]:
        b = self.ops.to_numpy(self.params["B"])
        return {"B_norm": float(np.linalg.norm(b))}
