"""`identity`: the module that changes nothing.

The lower bound of every benchmark and the check that the hook itself is transparent:
with it installed, greedy generation must equal the plain model token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmm.memory.base import MemoryConfig, MemoryModule, RewriteContext
from lmm.memory.registry import register
from lmm.ops import Array


@dataclass
class IdentityConfig(MemoryConfig):
    """No options."""


@register
class IdentityMemory(MemoryModule):
    name = "identity"
    config_cls = IdentityConfig

    def rewrite(self, hidden: Array, ctx: RewriteContext) -> Array:
        return hidden
