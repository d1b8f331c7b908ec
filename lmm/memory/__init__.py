"""The memory-module registry.

Adding a module is one file in this package plus one `register_memory` line below. The
registry maps a name to its config class and module class; it owns nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmm.memory.base import MemoryConfig, MemoryModule
from lmm.memory.chaptered_bank import ChapteredBank, ChapteredBankConfig
from lmm.memory.hash_gradient import HashGradientConfig, HashGradientMemory
from lmm.memory.identity import IdentityConfig, IdentityMemory
from lmm.memory.lora_on_user import LoraConfig, LoraOnUser
from lmm.memory.recurrent_state import RecurrentState, RecurrentStateConfig
from lmm.memory.trace_bank import TraceBank, TraceBankConfig
from lmm.ops import Ops


@dataclass(frozen=True)
class MemorySpec:
    name: str
    config_cls: type[MemoryConfig]
    module_cls: type[MemoryModule]


_REGISTRY: dict[str, MemorySpec] = {}


def register_memory(name: str, config_cls: type[MemoryConfig], module_cls: type[MemoryModule]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"memory module {name!r} is already registered")
    _REGISTRY[name] = MemorySpec(name, config_cls, module_cls)


def memory_names() -> list[str]:
    return list(_REGISTRY)


def get_memory_spec(name: str) -> MemorySpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown memory module {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def create_memory(
    name: str,
    *,
    hidden_size: int,
    ops: Ops,
    seed: int = 0,
    config: MemoryConfig | None = None,
    options: dict[str, str] | None = None,
) -> MemoryModule:
    """Instantiate a registered module from a config object or `key=value` option strings."""
    spec = get_memory_spec(name)
    if config is None:
        config = spec.config_cls.from_strings(options or {})
    elif not isinstance(config, spec.config_cls):
        raise ValueError(f"{name} needs a {spec.config_cls.__name__}, got {type(config).__name__}")
    return spec.module_cls(config, hidden_size=hidden_size, ops=ops, seed=seed)


register_memory("identity", IdentityConfig, IdentityMemory)
register_memory("lora_on_user", LoraConfig, LoraOnUser)
register_memory("hash_gradient", HashGradientConfig, HashGradientMemory)
register_memory("chaptered_bank", ChapteredBankConfig, ChapteredBank)
register_memory("recurrent_state", RecurrentStateConfig, RecurrentState)
register_memory("trace_bank", TraceBankConfig, TraceBank)
