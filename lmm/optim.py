"""Functional optimizers over a dict of backend arrays.

Written against `lmm.ops.Ops` so that an update takes exactly the same arithmetic on torch
and on mlx. Owns the moment estimates between steps; it does not own parameters (modules
do) or the loss (backends compute it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmm.ops import Array, Ops, Params


@dataclass
class _Moments:
    m: Array
    v: Array
    t: int = 0


@dataclass
class Optimizer:
    ops: Ops
    lr: float
    weight_decay: float = 0.0
    kind: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    state: dict[str, _Moments] = field(default_factory=dict)

    def step(self, params: Params, grads: Params) -> Params:
        return {name: self._step_one(name, value, grads[name]) for name, value in params.items()}

    def reset(self) -> None:
        self.state.clear()

    def _step_one(self, name: str, p: Array, g: Array) -> Array:
        if self.kind == "sgd":
            return p - self.lr * (g + self.weight_decay * p)
        b1, b2 = self.betas
        st = self.state.get(name)
        if st is None or tuple(st.m.shape) != tuple(p.shape):
            st = _Moments(m=self.ops.zeros(p.shape), v=self.ops.zeros(p.shape))
        if self.kind == "adam" and self.weight_decay:
            g = g + self.weight_decay * p
        st.t += 1
        st.m = b1 * st.m + (1 - b1) * g
        st.v = b2 * st.v + (1 - b2) * (g * g)
        self.state[name] = st
        m_hat = st.m / (1 - b1**st.t)
        v_hat = st.v / (1 - b2**st.t)
        if self.kind == "adamw":
            p = p * (1 - self.lr * self.weight_decay)
        return p - self.lr * m_hat / (self.ops.sqrt(v_hat) + self.eps)


def make_optimizer(kind: str, ops: Ops, **kwargs: Any) -> Optimizer:
    if kind not in {"adamw", "adam", "sgd"}:
        raise ValueError(f"optimizer must be one of adamw, adam, sgd; got {kind!r}")
    return Optimizer(ops=ops, kind=kind, **kwargs)
