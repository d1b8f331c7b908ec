"""`@register`: modules register next to their class, under their own name, once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lmm.memory import get_memory_spec, memory_names
from lmm.memory.base import MemoryConfig
from lmm.memory.identity import IdentityMemory
from lmm.memory.registry import register


def test_every_module_registered_under_its_class_name() -> None:
    assert memory_names() == ["identity", "lora_on_user", "hash_gradient", "chaptered_bank", "recurrent_state",
                              "trace_bank"]
    for name in memory_names():
        spec = get_memory_spec(name)
        assert spec.module_cls.name == name and spec.module_cls.config_cls is spec.config_cls


def test_a_second_class_under_a_taken_name_is_refused() -> None:
    @dataclass
    class OtherConfig(MemoryConfig):
        pass

    class Impostor(IdentityMemory):
        name = "identity"
        config_cls = OtherConfig

    with pytest.raises(ValueError, match="'identity' is already registered by IdentityMemory"):
        register(Impostor)
    assert get_memory_spec("identity").module_cls is IdentityMemory
    assert register(IdentityMemory) is IdentityMemory  # registering the same class again is harmless


def test_registration_needs_a_name_and_a_config_class() -> None:
    class Nameless(IdentityMemory):
        name = ""

    with pytest.raises(TypeError, match="name"):
        register(Nameless)

    class NoConfig(IdentityMemory):
        name = "no_config"
        config_cls = dict  # type: ignore[assignment]

    with pytest.raises(TypeError, match="config_cls"):
        register(NoConfig)
    assert "no_config" not in memory_names()
