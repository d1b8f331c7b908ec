"""trace_bank's column store and its mapped state file: rows read back as written across the mapped
head and the RAM tail, drops keep the others in order, and a memory opened from a file reads the
file's pages instead of copying them, still writes, forgets and saves over that same file."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
from trace_bank_helpers import FACT, OTHER, bank, engine, teach

from lmm.memory.trace_store import TraceStore
from lmm.memory.traces import Trace, pack4, quantize, trace_columns
from lmm.state import read_state

D = 8


def _traces(n: int, seed: int = 0) -> list[Trace]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        route, route_scale = pack4(rng.normal(size=(2 + i % 3, D)))
        sentence, sentence_scale = quantize(rng.normal(size=(1, D)))
        out.append(Trace(token_ids=rng.integers(0, 100, size=3 + i % 4, dtype=np.int32), route=route,
                         sentence=sentence[0], written=10 * i, used=10 * i, said_at=float(i),
                         replaced_by=-1, route_scale=route_scale, sentence_scale=sentence_scale))
    return out


def _same(a: Trace, b: Trace) -> bool:
    arrays = ("token_ids", "route", "sentence", "route_scale", "sentence_scale")
    scalars = ("written", "used", "said_at", "replaced_by")
    return (all(np.array_equal(getattr(a, k), getattr(b, k)) for k in arrays)
            and all(getattr(a, k) == getattr(b, k) for k in scalars))


def _store(traces: list[Trace]) -> TraceStore:
    store = TraceStore(D, np.dtype(np.uint8), quantized=True)
    for trace in traces:
        store.append(trace)
    return store


def _read_only(store: TraceStore) -> TraceStore:
    """A store over read-only copies of `store`'s columns, as a mapped file gives them."""
    columns = trace_columns({**store.tensors(), "buffer.clock": np.zeros(1)}, D, "trace_bank")
    assert columns is not None
    for value in columns.values():
        value.flags.writeable = False
    return TraceStore.from_columns(columns, D)


def test_rows_read_back_across_the_read_only_head_and_the_tail() -> None:
    traces = _traces(9)
    store = _read_only(_store(traces[:5]))
    for trace in traces[5:]:
        store.append(trace)
    assert len(store) == 9 and all(_same(store[i], t) for i, t in enumerate(traces))
    assert not store.route.head.flags.writeable  # the first five stayed where they were
    assert np.array_equal(store.sentence_states(3, 7), np.stack([t.sentence_state() for t in traces[3:7]]))
    again = _read_only(store)
    assert all(_same(again[i], t) for i, t in enumerate(traces))
    assert len(set(store.uid.tolist()) | set(again.uid.tolist())) == 18  # uids never repeat in a process


def test_drops_keep_the_other_rows_in_order_and_scalars_change_in_place() -> None:
    traces = _traces(7, seed=1)
    store = _read_only(_store(traces[:4]))
    for trace in traces[4:]:
        store.append(trace)
    store.drop([1, 5])
    kept = [t for i, t in enumerate(traces) if i not in (1, 5)]
    assert len(store) == 5 and all(_same(store[i], t) for i, t in enumerate(kept))
    store.set("used", [0, 2], 99)
    store.set("replaced_by", [4], 30)
    assert store.used.tolist() == [99, 20, 99, 40, 60] and store.current.tolist() == [True] * 4 + [False]
    assert int(store.row_bytes().sum()) == sum(t.route.nbytes + t.route_scale.nbytes + t.sentence.nbytes + 4
                                               + t.token_ids.nbytes + 40 for t in kept)
    # positive control: the comparison does see a changed row
    assert not _same(store[0], traces[0]) and store[0].used == 99


def test_a_memory_is_opened_from_the_files_pages_and_still_writes_forgets_and_saves(tiny_backend,
                                                                                     tmp_path: Path) -> None:
    be = tiny_backend("torch")
    eng = engine(be, dtype="int4")
    try:
        for text in (FACT, OTHER, "I work as a baker in Lyon."):
            teach(eng, text)
        path = eng.save_memory(tmp_path / "memory.safetensors")
        texts = [bank(eng)._text(t) for t in bank(eng).traces]
        chosen = bank(eng).select("What is my name?")
        eng.load_memory(path)
        head = bank(eng).traces.route.head
        assert not head.flags.writeable and isinstance(_owner(head), mmap.mmap)
        # positive control: an ordinary read copies (writable arrays of their own)
        assert read_state(path)[1]["buffer.route"].flags.writeable
        assert [bank(eng)._text(t) for t in bank(eng).traces] == texts
        assert bank(eng).select("What is my name?") == chosen
        teach(eng, "My bike lock code is 2905.")
        eng.save_memory(path)  # over the file its first rows are still mapped from
        assert [item.text for item in eng.memory_items()][-1] == "My bike lock code is 2905."
        eng.forget_item(1)
        eng.save_memory(path)
        eng.load_memory(path)
        assert [bank(eng)._text(t) for t in bank(eng).traces] == [*texts[1:], "My bike lock code is 2905."]
    finally:
        eng.close()


def _owner(array: np.ndarray) -> object:
    while isinstance(array.base, np.ndarray):
        array = array.base
    base = array.base
    return base.obj if isinstance(base, memoryview) else base


def test_mangled_trace_files_are_refused_in_one_line_or_load_whole(tiny_backend, tmp_path: Path) -> None:
    """The mapped reader under fuzzing (each case its own file: lmm never rewrites a file in place)."""
    import random

    from test_state_safety import _mutations

    from lmm.state import StateFileError

    be = tiny_backend("torch")
    eng = engine(be, dtype="int4")
    try:
        for text in (FACT, OTHER):
            teach(eng, text)
        data = eng.save_memory(tmp_path / "good.safetensors").read_bytes()
        rng = random.Random(1)
        outcomes = {"loaded": 0, "refused": 0}
        for i in range(300):
            path = tmp_path / f"fuzz{i}.safetensors"
            path.write_bytes(_mutations(data, rng))
            try:
                eng.load_memory(path)
                outcomes["loaded"] += 1
                tensors = bank(eng).state_tensors()  # every mapped page is read
                assert all(np.isfinite(v).all() for v in tensors.values() if v.dtype.kind == "f")
                bank(eng).select("What is my name?")
            except StateFileError as exc:
                assert "\n" not in str(exc) and str(path) in str(exc)
                outcomes["refused"] += 1
        assert outcomes["refused"] > 150 and outcomes["loaded"] > 0, outcomes
    finally:
        eng.close()
