"""The on-disk cache of arrays that depend on the frozen model only (`lmm.model_cache`): computed once,
read by the next process, keyed on the exact model files, safe against damaged and unwritable caches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lmm.model_cache import CACHE_ENV, cached_arrays, model_fingerprint


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, np.ndarray]:
        self.calls += 1
        return {"a": np.arange(6, dtype=np.float32).reshape(2, 3) + self.calls}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_computed_once_then_read(cache: Path) -> None:
    compute = Counter()
    first = cached_arrays("fp", "k.1", compute)
    again = cached_arrays("fp", "k.1", compute)
    assert compute.calls == 1 and np.array_equal(first["a"], again["a"])
    cached_arrays("fp", "k.2", compute)  # the positive control: another key computes
    cached_arrays("other", "k.1", compute)  # and another model
    assert compute.calls == 3
    assert not list(cache.rglob("*.tmp"))


def test_no_fingerprint_no_cache(cache: Path) -> None:
    compute = Counter()
    cached_arrays(None, "k", compute)
    cached_arrays(None, "k", compute)
    assert compute.calls == 2 and not cache.exists()


def test_a_damaged_file_is_computed_again_and_replaced(cache: Path) -> None:
    compute = Counter()
    cached_arrays("fp", "k", compute)
    (path,) = cache.rglob("*.safetensors")
    path.write_bytes(b"\x00garbage")
    out = cached_arrays("fp", "k", compute)
    assert compute.calls == 2 and np.array_equal(cached_arrays("fp", "k", compute)["a"], out["a"])
    assert compute.calls == 2


def test_an_unwritable_cache_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    compute = Counter()
    assert cached_arrays("fp", "k", compute)["a"].shape == (2, 3)
    cached_arrays("fp", "k", compute)
    assert compute.calls == 2


def test_the_fingerprint_follows_the_model_files(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"1234")
    (folder / "config.json").write_text("{}")
    fp = model_fingerprint(folder, "m", "torch", "cpu:float32")
    assert fp == model_fingerprint(folder, "m", "torch", "cpu:float32")
    assert fp != model_fingerprint(folder, "m", "mlx_lm", "cpu:float32")
    assert fp != model_fingerprint(folder, "m", "torch", "cpu:torch.float16")
    stat = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert model_fingerprint(folder, "m", "torch", "cpu:float32") != fp  # weights replaced: a new key
    assert model_fingerprint(None, "m", "torch", "") is None


def test_a_new_backend_reads_the_write_gate_instead_of_fitting_it(tiny_models: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """A second load of the same model (a new process, as far as the cache can tell) fits nothing:
    no forward of the gate's examples, the same probe."""
    from lmm.backends import load_backend
    from lmm.memory import trace_gate

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder = tiny_models["llama"]
    first = trace_gate.gate_probe(load_backend("torch", folder, "tiny").view(), 1)
    calls = []
    original = trace_gate.content_state
    monkeypatch.setattr(trace_gate, "content_state", lambda *a: calls.append(a) or original(*a))
    second = trace_gate.gate_probe(load_backend("torch", folder, "tiny").view(), 1)
    assert calls == [] and np.array_equal(first.direction, second.direction)
    trace_gate.gate_probe(load_backend("torch", folder, "tiny").view(), 0)  # the positive control
    assert len(calls) == len(trace_gate.INFORM) + len(trace_gate.OTHER)
