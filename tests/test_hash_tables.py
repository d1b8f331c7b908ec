"""hash_gradient's consolidated facts on the tiny models: each fact holds `fact_tables` tables hashed through
different projections and a reply reads the mean of its row in each (both backends); a state written when a
fact held one table (no `fact_seed`) loads and reads as it did, while new facts get the configured tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fact_gate_helpers import QUESTIONS, consolidated, engine_for

from lmm.memory.base import RewriteContext, StateError
from lmm.memory.hash_gradient import HashGradientMemory, nearest, table_names


def hidden_states(be, n: int = 7) -> object:
    x = np.random.default_rng(1).normal(0, 2, size=(1, n, be.hidden_size)).astype(np.float32)
    return be.ops.asarray(x)


def read(module: HashGradientMemory, x: object, facts: list[int]) -> np.ndarray:
    module._open = facts
    try:
        return module.ops.to_numpy(module.rewrite(x, RewriteContext(phase="generate", offset=0)))
    finally:
        module._open = []


@pytest.mark.parametrize("name", ["torch", pytest.param("mlx_lm", marks=pytest.mark.mlx)])
def test_a_fact_reads_the_mean_of_its_tables(name: str, tiny_backend, tmp_path: Path) -> None:
    be = tiny_backend(name)
    engine = engine_for(be, tmp_path, "hash_gradient", fact_tables="3")
    module = consolidated(engine)
    assert isinstance(module, HashGradientMemory)
    assert module._tables(0) == [table_names(0, k) for k in range(3)]
    x = hidden_states(be)
    codes = [c.reshape(-1) for c in module._fact_codes(x, 3)]
    assert not (np.array_equal(codes[0], codes[1]) and np.array_equal(codes[1], codes[2]))  # own projections
    ops, plain = module.ops, module.ops.to_numpy(x)
    parts = []
    for k, (rows_name, keys_name) in enumerate(module._tables(0)):
        rows = ops.to_numpy(module.params[rows_name])
        parts.append(rows[nearest(codes[k], ops.to_numpy(module.buffers[keys_name]), module.config.fact_radius)])
    assert not np.allclose(parts[0], parts[1])  # the tables differ, so the mean is not any one of them
    expected = plain + np.mean(parts, axis=0).reshape(plain.shape) * module.scale * module.config.fact_scale
    assert np.allclose(read(module, x, [0]), expected, atol=1e-4)
    assert np.array_equal(read(module, x, []), plain)
    engine.close()


def test_a_state_with_one_table_per_fact_loads_and_reads_as_before(tiny_backend, tmp_path: Path) -> None:
    be = tiny_backend("torch")
    engine = engine_for(be, tmp_path, "hash_gradient", fact_tables="1")
    module = consolidated(engine)
    x = hidden_states(be)
    before = read(module, x, [0])
    old = {k: np.array(v, copy=True) for k, v in module.state_tensors().items() if k != "buffer.fact_seed"}
    engine.close()
    again = engine_for(be, tmp_path, "hash_gradient")  # the default: several tables
    loaded = again.module
    assert isinstance(loaded, HashGradientMemory) and loaded.config.fact_tables > 1
    loaded.load_state_tensors(old)
    assert loaded._tables(0) == [table_names(0, 0)]
    assert np.array_equal(read(loaded, x, [0]), before)
    with loaded.consolidating(QUESTIONS, ["How are you today?"]):  # a new fact gets the configured tables
        pass
    assert len(loaded._tables(1)) == loaded.config.fact_tables
    # positive control: a table's rows without its keys is refused, naming them
    broken = {**loaded.state_tensors()}
    del broken["buffer." + table_names(1, 1)[1]]
    with pytest.raises(StateError, match=table_names(1, 1)[1]):
        loaded.load_state_tensors(broken)
    assert len(loaded._tables(1)) == loaded.config.fact_tables  # a failed load keeps the facts
    again.close()
