"""The function installed on the hooked layer: memory rewrite plus activation logging.

Owns what happens on each call of the hooked layer: it passes the hidden states through
the memory module, keeps the module's input from scoring passes (a module that keys its
memory on hidden states learns from them), and logs input/output slices. It owns no
model code (backends install it) and no learning (the engine's learner does that).
"""

from __future__ import annotations

import time

from lmm.events import ActivationRecord, EventLog
from lmm.memory.base import MemoryModule
from lmm.ops import Array
from lmm.types import RewriteContext


class MemoryHook:
    def __init__(self, module: MemoryModule, log: EventLog, *, layer: int, backend: str, model: str,
                 log_activations: bool = True) -> None:
        self.module = module
        self.log = log
        self.layer = layer
        self.backend = backend
        self.model = model
        self.log_activations = log_activations
        self.calls = 0
        self.captured: Array | None = None

    def __call__(self, hidden: Array, ctx: RewriteContext) -> Array:
        if ctx.phase == "score":
            self.captured = hidden
        out = self.module.rewrite(hidden, ctx)
        self.calls += 1
        # Traced arrays (train phase under mlx) cannot be read back; log real passes only.
        if self.log_activations and ctx.phase != "train" and self.log.enabled:
            self._log(hidden, out, ctx)
        return out

    def _log(self, hidden: Array, out: Array, ctx: RewriteContext) -> None:
        ops = self.module.ops
        k = self.log.activation_tail
        self.log.write(ActivationRecord(
            layer=self.layer, call_index=self.calls - 1, backend=self.backend, model=self.model,
            module=self.module.name, phase=ctx.phase, shape=[int(s) for s in hidden.shape],
            input_tail=ops.to_numpy(hidden[:, -1, -k:]).tolist(),
            output_tail=ops.to_numpy(out[:, -1, -k:]).tolist(),
            time=time.time(),
        ))
