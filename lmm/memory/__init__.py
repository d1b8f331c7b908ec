"""The memory modules: the registry's functions, and the registered modules themselves.

Adding a module is one file in this package whose class carries `@register` (from
`lmm.memory.registry`), plus its import below, which is what registers it.
"""

from __future__ import annotations

# In the order `--memory` and the benchmark list them.
# isort: off
from lmm.memory import identity, lora_on_user, hash_gradient, chaptered_bank, recurrent_state  # noqa: F401
from lmm.memory import trace_bank  # noqa: F401
# isort: on
from lmm.memory.registry import MemorySpec, create_memory, get_memory_spec, memory_names, register

__all__ = ["MemorySpec", "create_memory", "get_memory_spec", "memory_names", "register"]
