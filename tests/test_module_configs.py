"""Every registered module's config: a bad value is refused by a message naming its field.

Known bad values per field, then generic probes (an absurd number or string either passes or is
refused naming the field) and the `--mm-opt` string parser, for every module in the registry.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from lmm.memory import create_memory, get_memory_spec, memory_names

MODULES = memory_names()


KNOWN_BAD: dict[str, tuple[object, ...]] = {
    "lr": (0.0,), "steps": (-1,), "optimizer": ("rmsprop",), "weight_decay": (-0.1,), "rank": (0,),
    "init_std": (0.0,), "bits": (7, 25, 6), "radius": (-1,), "max_rows": (-1,),
    "fact_margin": (3.0,), "fact_question_margin": (-2.0,), "fact_top_k": (0,), "fact_rank": (0,),
    "fact_scale": (0.0,), "fact_slots": (0,), "fact_bits": (3,), "fact_radius": (-1,),
    "fact_statement_weight": (-0.5,), "fact_tables": (0, 9),
}


@pytest.mark.parametrize("module", MODULES)
def test_bad_config_value_raises_naming_the_field(module: str) -> None:
    spec = get_memory_spec(module)
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    refused = set()
    for name, values in KNOWN_BAD.items():
        for bad in values if name in fields else ():
            with pytest.raises(ValueError, match=rf"\b{name}\b"):
                spec.config_cls(**{name: bad})
            refused.add(name)
    # Generic probes: an absurd value either passes or is refused by a message naming its field.
    for name, f in fields.items():
        default = f.default
        probes: list[object] = []
        if isinstance(default, bool):
            probes = []
        elif isinstance(default, int):
            probes = [-(10**9)]
        elif isinstance(default, float):
            probes = [-1e9, float("nan")]
        elif isinstance(default, str):
            probes = ["__no_such_choice__"]
        for bad in probes:
            try:
                spec.config_cls(**{name: bad})
            except ValueError as exc:
                assert re.search(rf"\b{name}\b", str(exc)), f"{module}: {exc} does not name {name}"
                refused.add(name)
        # Strings that are not of the field's type are refused by the option parser, naming the key.
        if isinstance(default, (bool, int, float)):
            with pytest.raises(ValueError, match=rf"\b{name}\b"):
                spec.config_cls.from_strings({name: "not-a-number"})
    if fields:
        assert refused, f"{module}: no config value is ever refused"
    with pytest.raises(ValueError, match="no_such_option"):
        spec.config_cls.from_strings({"no_such_option": "1"})
    with pytest.raises(ValueError, match="no_such_option"):
        create_memory(module, hidden_size=8, ops=None, options={"no_such_option": "1"})  # type: ignore[arg-type]
