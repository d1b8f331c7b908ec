"""The memory-module registry: `@register` on a module class, and lookup by name.

Owns the name -> (config class, module class) map and the check that names are unique. It
imports only the contract (`lmm.memory.base`), so module files import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from lmm.memory.base import MemoryConfig, MemoryModule
from lmm.ops import Ops

M = TypeVar("M", bound=type[MemoryModule])


@dataclass(frozen=True)
class MemorySpec:
    name: str
    config_cls: type[MemoryConfig]
    module_cls: type[MemoryModule]


_REGISTRY: dict[str, MemorySpec] = {}


def register(cls: M) -> M:
    """Class decorator: register a module under its `name`, with its `config_cls`."""
    name, config_cls = getattr(cls, "name", None), getattr(cls, "config_cls", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if not (isinstance(config_cls, type) and issubclass(config_cls, MemoryConfig)):
        raise TypeError(f"{cls.__name__}.config_cls must be a MemoryConfig subclass")
    if name in _REGISTRY and _REGISTRY[name].module_cls is not cls:
        raise ValueError(f"memory module {name!r} is already registered by {_REGISTRY[name].module_cls.__name__}")
    _REGISTRY[name] = MemorySpec(name, config_cls, cls)
    return cls


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
