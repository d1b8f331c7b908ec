"""`trace_bank`'s store: every trace of one memory, kept column by column.

Owns where the traces' numbers live: one array per field for all traces (token ids and routing
states as ragged rows with their lengths), so that opening a memory builds no per-trace object.
A loaded memory's large columns are the state file's own pages, mapped read-only (`read_state
(mapped=True)`), and are read only when touched: opening 10 or 10,000 traces costs the same few
milliseconds, and a trace that is never routed to stays on disk. New traces go to a tail in RAM;
dropping a trace (a restatement, `/forget`, the disk budget) copies the store into RAM once.
`store[i]` is a `Trace`: a snapshot whose arrays are views (change the store through its methods).
It does not own what the columns mean for routing (`lmm.memory.trace_routing`) nor the file format's
older forms and checks (`lmm.memory.traces.unpack_traces`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from lmm.memory.traces import TRACE_FORMAT, Trace, dequantize

SCALARS = ("written", "used", "replaced_by", "said_at")  # small columns, always in RAM (they change)
_UIDS = [0]  # uids are unique in the process: caches and the backend's read blocks are keyed by them
_UID_LOCK = threading.Lock()


def _new_uids(n: int) -> np.ndarray:
    with _UID_LOCK:
        start = _UIDS[0] + 1
        _UIDS[0] += n
    return np.arange(start, start + n, dtype=np.int64)


class Column:
    """The rows of one array: a read-only head (often the state file's mapped pages) and a tail that
    grows in RAM by doubling, so appending a trace does not copy the store."""

    def __init__(self, head: np.ndarray) -> None:
        self.head = head
        self._tail = np.empty((0, *head.shape[1:]), dtype=head.dtype)
        self._n = 0

    def __len__(self) -> int:
        return len(self.head) + self._n

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=self.head.dtype)
        need = self._n + len(rows)
        if need > len(self._tail):
            grown = np.empty((max(16, 2 * need), *self.head.shape[1:]), dtype=self.head.dtype)
            grown[: self._n] = self._tail[: self._n]
            self._tail = grown
        self._tail[self._n: need] = rows
        self._n = need

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows a..b: a view, unless the range spans the head and the tail."""
        h = len(self.head)
        if b <= h:
            return self.head[a:b]
        if a >= h:
            return self._tail[a - h: b - h]
        return np.concatenate([self.head[a:], self._tail[: b - h]])

    def array(self) -> np.ndarray:
        return self.head if not self._n else np.concatenate([self.head, self._tail[: self._n]])

    def keep(self, mask: np.ndarray) -> None:
        """Only the rows where `mask` holds, copied into RAM (the mapped head is let go)."""
        self.head, self._n = np.ascontiguousarray(self.array()[mask]), 0


class TraceStore:
    """Every trace of a memory. Indices are row numbers (oldest first, unless a drop reordered)."""

    def __init__(self, hidden_size: int, route_dtype: np.dtype, quantized: bool) -> None:
        width = hidden_size // 2 if route_dtype == np.uint8 else hidden_size
        self.hidden_size, self.quantized = hidden_size, quantized
        self.tokens = Column(np.zeros(0, dtype=np.int32))
        self.route = Column(np.zeros((0, width), dtype=route_dtype))
        self.route_scale = Column(np.zeros(0, dtype=np.float32)) if quantized else None
        self.sentence = Column(np.zeros((0, hidden_size), dtype=np.int8 if quantized else route_dtype))
        self.sentence_scale = Column(np.zeros(0, dtype=np.float32)) if quantized else None
        self._token_len = _Grow(np.int64)
        self._route_len = _Grow(np.int64)
        self._token_end = _Grow(np.int64)
        self._route_end = _Grow(np.int64)
        self._scalars = {k: _Grow(np.float64 if k == "said_at" else np.int64) for k in SCALARS}
        self._uid = _Grow(np.int64)

    @classmethod
    def from_columns(cls, columns: dict[str, np.ndarray], hidden_size: int) -> TraceStore:
        """A store over checked `pack`-style columns (no copy of the large ones); every key of
        `TRACE_KEYS`, with `said_at`/`replaced_by` filled in and the scales present iff quantised."""
        quantized = "route_scale" in columns
        store = cls(hidden_size, columns["route"].dtype, quantized)
        store.tokens, store.route, store.sentence = (Column(columns[k]) for k in ("token_ids", "route", "sentence"))
        if quantized:
            store.route_scale, store.sentence_scale = Column(columns["route_scale"]), Column(columns["sentence_scale"])
        store._set_lengths(np.asarray(columns["trace_tokens"], dtype=np.int64),
                           np.asarray(columns["route_tokens"], dtype=np.int64))
        for key in SCALARS:
            store._scalars[key].reset(columns[key])
        store._uid.reset(_new_uids(len(store._token_len)))
        return store

    # --- shape ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._uid)

    def __getitem__(self, i: int) -> Trace:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"trace {i} of {n}")
        i %= n
        t_end, r_end = int(self._token_end.view[i]), int(self._route_end.view[i])  # ends: lengths summed
        t0, r0 = t_end - int(self._token_len.view[i]), r_end - int(self._route_len.view[i])
        s = self._scalars
        return Trace(token_ids=self.tokens.rows(t0, t_end), route=self.route.rows(r0, r_end),
                     sentence=self.sentence.rows(i, i + 1)[0], written=int(s["written"].view[i]),
                     used=int(s["used"].view[i]), said_at=float(s["said_at"].view[i]),
                     replaced_by=int(s["replaced_by"].view[i]),
                     route_scale=None if self.route_scale is None else self.route_scale.rows(r0, r_end),
                     sentence_scale=None if self.sentence_scale is None else self.sentence_scale.rows(i, i + 1),
                     uid=int(self._uid.view[i]))

    def __iter__(self) -> Iterator[Trace]:
        return (self[i] for i in range(len(self)))

    # --- columns (views: read them, change them through the methods below) --------------------------
    @property
    def written(self) -> np.ndarray:
        return self._scalars["written"].view

    @property
    def used(self) -> np.ndarray:
        return self._scalars["used"].view

    @property
    def said_at(self) -> np.ndarray:
        return self._scalars["said_at"].view

    @property
    def replaced_by(self) -> np.ndarray:
        return self._scalars["replaced_by"].view

    @property
    def current(self) -> np.ndarray:
        return self.replaced_by < 0

    @property
    def uid(self) -> np.ndarray:
        return self._uid.view

    @property
    def token_counts(self) -> np.ndarray:
        return self._token_len.view

    def sentence_states(self, a: int, b: int) -> np.ndarray:
        """float32 [b - a, d]: the whole-turn states of traces a..b."""
        rows = self.sentence.rows(a, b)
        return dequantize(rows, None if self.sentence_scale is None else self.sentence_scale.rows(a, b))

    @property
    def route_dtype(self) -> np.dtype:
        return self.route.head.dtype

    def row_bytes(self) -> np.ndarray:
        """Bytes each trace takes in the state file (40: its scalars)."""
        route_row = self.route.head.shape[1] * self.route.head.itemsize + (4 if self.quantized else 0)
        sentence_row = self.sentence.head.shape[1] * self.sentence.head.itemsize + (4 if self.quantized else 0)
        return self._route_len.view * route_row + self._token_len.view * 4 + sentence_row + 40

    # --- changes ------------------------------------------------------------------------------------
    def append(self, trace: Trace) -> int:
        """Add `trace` (stored in this store's form) as the last row; returns its uid."""
        self.tokens.append(trace.token_ids)
        self.route.append(trace.route)
        self.sentence.append(trace.sentence[None])
        if self.route_scale is not None and self.sentence_scale is not None:
            self.route_scale.append(trace.route_scale)
            self.sentence_scale.append(trace.sentence_scale)
        self._token_len.append(len(trace.token_ids))
        self._route_len.append(len(trace.route))
        self._token_end.append((self._token_end.view[-1] if len(self._token_end) else 0) + len(trace.token_ids))
        self._route_end.append((self._route_end.view[-1] if len(self._route_end) else 0) + len(trace.route))
        for key in SCALARS:
            self._scalars[key].append(getattr(trace, key))
        uid = int(_new_uids(1)[0])
        self._uid.append(uid)
        return uid

    def set(self, field: str, rows: np.ndarray | list[int] | int, value: float) -> None:
        """Set a scalar field (`used`, `replaced_by`, ...) of some rows."""
        self._scalars[field].view[rows] = value

    def drop(self, rows: list[int] | np.ndarray) -> None:
        """Remove some traces (the others keep their order)."""
        keep = np.ones(len(self), dtype=bool)
        keep[np.asarray(rows, dtype=np.int64)] = False
        tokens_keep = np.repeat(keep, self._token_len.view)
        route_keep = np.repeat(keep, self._route_len.view)
        self.tokens.keep(tokens_keep)
        self.route.keep(route_keep)
        self.sentence.keep(keep)
        if self.route_scale is not None and self.sentence_scale is not None:
            self.route_scale.keep(route_keep)
            self.sentence_scale.keep(keep)
        self._set_lengths(self._token_len.view[keep], self._route_len.view[keep])
        for key in SCALARS:
            self._scalars[key].reset(self._scalars[key].view[keep])
        self._uid.reset(self._uid.view[keep])

    def _set_lengths(self, token_len: np.ndarray, route_len: np.ndarray) -> None:
        self._token_len.reset(token_len)
        self._route_len.reset(route_len)
        self._token_end.reset(np.cumsum(token_len))
        self._route_end.reset(np.cumsum(route_len))

    # --- the state file -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        """The traces as flat `buffer.*` tensors (only the format tag for none)."""
        out = {"buffer.trace_format": np.asarray([TRACE_FORMAT], dtype=np.int32)}
        if not len(self):
            return out
        out.update({
            "buffer.route": self.route.array(), "buffer.sentence": self.sentence.array(),
            "buffer.token_ids": self.tokens.array(),
            "buffer.trace_tokens": self._token_len.view.astype(np.int32),
            "buffer.route_tokens": self._route_len.view.astype(np.int32),
            **{f"buffer.{k}": self._scalars[k].view.copy() for k in SCALARS},
        })
        if self.route_scale is not None and self.sentence_scale is not None:
            out["buffer.route_scale"] = self.route_scale.array()
            out["buffer.sentence_scale"] = self.sentence_scale.array()
        return out


class _Grow:
    """A growable 1-D array in RAM (doubling); `view` is the live rows, writable."""

    def __init__(self, dtype: type) -> None:
        self._data = np.zeros(16, dtype=dtype)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def view(self) -> np.ndarray:
        return self._data[: self._n]

    def append(self, value: float) -> None:
        if self._n == len(self._data):
            self._data = np.concatenate([self._data, np.zeros_like(self._data)])
        self._data[self._n] = value
        self._n += 1

    def reset(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self._data.dtype)
        self._data = np.zeros(max(16, 2 * len(values)), dtype=self._data.dtype)
        self._data[: len(values)] = values
        self._n = len(values)
