"""Trace records for `trace_bank`: the routing arithmetic and the state layout.

Owns what a trace is (`Trace`), the late-interaction score, the neutral sentences that centre and
weight routing states, and the checks of a state file's trace tensors (format 2, compact; format-1
files are read and upgraded). It holds no model code: encoding text, routing decisions and reading
traces live in `trace_bank`; where the traces are kept, in `trace_store`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import numpy as np

from lmm.memory.base import StateError

# Generic messages whose routing states give the centring mean (no memory content, no benchmark text).
CALIBRATION = (
    "Good morning!",
    "Could you help me plan a weekend trip?",
    "What time does the sun set in winter?",
    "Tell me something interesting about ancient history.",
    "How does the internet actually work?",
    "Please summarise the main idea in two sentences.",
    "I am a bit busy this week.",
    "The weather has been lovely lately.",
    "Can you write a short poem about trees?",
    "What is the best way to learn a new language?",
    "I usually go for a walk after lunch.",
    "Why do cats purr?",
    "My friend recommended a film to me yesterday.",
    "Thanks, that was really helpful.",
    "Explain how bicycle gears work.",
    "We spent the afternoon at the market.",
    "Is it better to study in the morning or at night?",
    "List three healthy snacks.",
    "Our train was late again today.",
    "Translate 'good night' into German.",
)

@dataclass(slots=True)
class Trace:
    """One stored statement. Compact: its token ids and routing states, not keys/values (those are
    recomputed for the few traces a reply reads, in one short forward)."""

    token_ids: np.ndarray  # int32 [L]: the statement's tokens
    route: np.ndarray  # [R, d] routing states of the content tokens (int8 with `route_scale`, or float;
    #                    int4: [R, d/2] uint8, centred on the memory's calibration mean)
    sentence: np.ndarray  # [d] mean state of the user turn entering sentence_layer (same storage)
    written: int  # clock at writing (unique per trace: the trace's stable number)
    used: int  # clock at the last retrieval (written, until retrieved)
    said_at: float = float("nan")  # when the user said it (Unix time; NaN in files older than this field)
    replaced_by: int = -1  # `written` of the newer statement that superseded it (-1: current)
    route_scale: np.ndarray | None = None  # float32 [R]: per-row scales of an int8 `route`
    sentence_scale: np.ndarray | None = None  # float32 [1]: the scale of an int8 `sentence`
    uid: int = 0  # in-process identity (caches), not saved

    @property
    def current(self) -> bool:
        return self.replaced_by < 0

    def route_states(self, center: np.ndarray | None = None) -> np.ndarray:
        """The routing states as written (an int4 trace is kept centred: it needs the memory's `center`)."""
        if self.route.dtype == np.uint8:
            if center is None:
                raise ValueError("an int4 trace's routing states need the memory's centre")
            return unpack4(self.route, self.route_scale) + center
        return dequantize(self.route, self.route_scale)

    def centred_route(self, center: np.ndarray) -> np.ndarray:
        """The routing states minus the memory's calibration mean `center` (what routing compares)."""
        if self.route.dtype == np.uint8:
            return unpack4(self.route, self.route_scale)
        return dequantize(self.route, self.route_scale) - center

    def sentence_state(self) -> np.ndarray:
        return dequantize(self.sentence[None], self.sentence_scale)[0]

    def stored_as(self, dtype: str, center: np.ndarray | None = None) -> Trace:
        """This trace with its routing states kept as `dtype`: int4 (centred on `center`, two per byte,
        a scale per row), int8 (a scale per row) or a float type. The sentence state: int8 for both
        integer forms."""
        route, sentence = self.route_states(center), self.sentence_state()
        if dtype in ("int4", "int8"):
            if dtype == "int4" and center is None:
                raise ValueError("int4 storage needs the memory's centre")
            r, rs = pack4(route - center) if dtype == "int4" else quantize(route)
            s, ss = quantize(sentence[None])
            return replace(self, route=r, route_scale=rs, sentence=s[0], sentence_scale=ss)
        return replace(self, route=route.astype(dtype), sentence=sentence.astype(dtype), route_scale=None,
                       sentence_scale=None)


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype that holds routing states stored as `name` (int4: packed in uint8)."""
    return np.dtype(np.uint8 if name == "int4" else name)


def _round_rows(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `x` as integers in [-levels, levels] and a float32 scale per row (its largest magnitude
    over `levels`)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.maximum(np.abs(x).max(axis=-1), 1e-12) / levels
    return np.clip(np.rint(x / scale[..., None]), -levels, levels), scale.astype(np.float32)


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `x` as int8 times a float32 scale per row."""
    q, scale = _round_rows(x, 127)
    return q.astype(np.int8), scale


def pack4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `x` (even width) as 4-bit integers in [-7, 7], two per byte, and a float32 scale per row.
    On the development facts, routing ranks the right trace first as often as with int8 when the rows
    are centred first (docs/trace_bank.md)."""
    if np.shape(x)[-1] % 2:
        raise ValueError(f"int4 storage needs an even width, got {np.shape(x)[-1]}")
    q, scale = _round_rows(x, 7)
    q = (q + 8).astype(np.uint8)
    return (q[..., 0::2] << 4) | q[..., 1::2], scale


def unpack4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    out = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), dtype=np.float32)
    out[..., 0::2] = (packed >> 4).astype(np.float32) - 8.0
    out[..., 1::2] = (packed & 15).astype(np.float32) - 8.0
    return out * scale[..., None]


def dequantize(x: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    if scale is None:
        return np.asarray(x, dtype=np.float32)
    return x.astype(np.float32) * scale[..., None]


K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A small least-recently-used cache (encoded messages, their log-probabilities, read blocks)."""

    def __init__(self, size: int) -> None:
        self.size, self._items = size, OrderedDict[K, V]()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> V:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


def late_interaction(query: np.ndarray, keys: np.ndarray, starts: np.ndarray,
                      weights: np.ndarray | None = None) -> np.ndarray:
    """Per segment of `keys` (rows from each `starts[i]`): the (weighted) mean over query rows of
    the best cosine."""
    best = np.maximum.reduceat(query @ keys.T, starts, axis=1)  # [m, segments]
    if weights is None:
        return best.mean(axis=0)
    return (weights[:, None] * best).sum(axis=0) / max(float(weights.sum()), 1e-6)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


TRACE_FORMAT = 2  # 1: keys/values of every layer kept per trace (read and upgraded); 2: compact
TRACE_KEYS = ("route", "sentence", "token_ids", "trace_tokens", "route_tokens", "written", "used")
OPTIONAL_KEYS = ("said_at", "replaced_by", "route_scale", "sentence_scale")  # absent from older files
RETIRED_KEYS = ("keys", "values", "starts")  # format 1's stored keys/values: dropped on load


def _distinct(values: np.ndarray) -> bool:
    ordered = np.sort(values)
    return bool((ordered[1:] != ordered[:-1]).all())


def trace_columns(tensors: dict[str, np.ndarray], hidden_size: int, module: str) -> dict[str, np.ndarray] | None:
    """The checked trace columns of a state file (format 2, or format 1 whose keys/values are dropped:
    they are rebuilt from the token ids when read), keyed as `TRACE_KEYS` plus `said_at`,
    `replaced_by` (filled in for older files) and the scales of quantised states; None for no traces.
    Nothing is copied. StateError naming the problem when tensors disagree."""
    fmt = tensors.get("buffer.trace_format")
    version = 1 if fmt is None else int(np.asarray(fmt).reshape(-1)[0])
    if version not in (1, TRACE_FORMAT):
        raise StateError(f"trace format {version} in state for module {module}; this lmm reads 1 and {TRACE_FORMAT}")
    present = [k for k in TRACE_KEYS if f"buffer.{k}" in tensors]
    if present and len(present) != len(TRACE_KEYS):
        missing = sorted(set(TRACE_KEYS) - set(present))
        raise StateError(f"state is missing tensor(s) {', '.join('buffer.' + k for k in missing)} "
                         f"for module {module}")
    if not present:
        return None
    g = {k: tensors[f"buffer.{k}"] for k in TRACE_KEYS}
    lens, rlens, n = g["trace_tokens"], g["route_tokens"], len(g["trace_tokens"])
    width = hidden_size // 2 if g["route"].dtype == np.uint8 else hidden_size  # int4: two per byte
    ok = (g["route"].ndim == 2 and g["route"].shape == (int(rlens.sum()), width)
          and int(lens.sum()) == len(g["token_ids"]) and g["sentence"].shape == (n, hidden_size)
          and all(len(g[k]) == n for k in ("route_tokens", "written", "used"))
          and bool((lens > 0).all()) and bool((rlens > 0).all()) and _distinct(g["written"]))
    if version == 1 and "buffer.keys" in tensors:
        ok = ok and tensors["buffer.keys"].ndim == 4 and tensors["buffer.keys"].shape[2] == int(lens.sum())
    extra = {k: tensors.get(f"buffer.{k}") for k in OPTIONAL_KEYS}
    quantized = g["route"].dtype in (np.int8, np.uint8)
    ok = ok and all(v is None or v.shape == (n,) for k, v in extra.items() if k != "route_scale")
    ok = ok and quantized == (extra["route_scale"] is not None) == (extra["sentence_scale"] is not None)
    ok = ok and (g["sentence"].dtype == np.int8) == quantized
    ok = ok and (not quantized or extra["route_scale"].shape == (int(rlens.sum()),))
    # a scale past any hidden state's size is a damaged file (routing would overflow)
    ok = ok and (not quantized or all(bool(((x > 0) & (x < 1e6)).all())
                                      for x in (extra["route_scale"], extra["sentence_scale"])))
    if not ok:
        raise StateError(f"inconsistent trace tensors in state for module {module}")
    columns = dict(g, token_ids=g["token_ids"].astype(np.int32, copy=False))
    columns["said_at"] = extra["said_at"] if extra["said_at"] is not None else np.full(n, np.nan)
    columns["replaced_by"] = extra["replaced_by"] if extra["replaced_by"] is not None else np.full(n, -1)
    if quantized:
        columns["route_scale"], columns["sentence_scale"] = extra["route_scale"], extra["sentence_scale"]
    return columns
