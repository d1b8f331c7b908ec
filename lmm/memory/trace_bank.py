"""`trace_bank`: what the user said, kept as key/value traces that the model's attention reads.

Owns the trace store and its two halves. Write (`write`, after each user message): the message's
statements (sentences that are not questions; with `write_gate`, only when one speaks in the
first person) run once through the frozen model as the only user turn; the keys and values of
their content tokens at layers >= `start_layer` (RoPE applied at the positions they were computed
at) become one trace, with two routing keys: content-token states entering `routing_layer`, and
the turn's mean state entering `sentence_layer`. Read (`before_reply`, before each reply): the
last user message is encoded the same way and scored against every trace, token by token (late
interaction weighted by how specific each query token is) and as a whole; with `read_gate`, only
messages that speak of the user route. The best trace past either threshold is handed to the model
as extra keys/values (each token `read_gain` times); with none, replies are the plain model's,
bit for bit. Nothing is forgotten by accident: past `max_traces` (100,000) or the disk budget
`max_bytes`, the least recently read traces go, and the write says which; `dedupe` replaces a
restated statement; statements longer than `max_trace_tokens` are not stored.

It does not own the routing arithmetic or the state packing (`lmm.memory.traces`) nor how the
model reads extra keys/values (the backends). How the defaults were chosen, with the
development-set figures: `docs/trace_bank.md`. Limits: one trace per reply, similarity-only
retrieval, English first-person gates.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmm.memory.base import DirectMemory, MemoryConfig, MemoryItem, RewriteContext, StateError, WriteResult
from lmm.memory.registry import register
from lmm.memory.traces import (
    CALIBRATION,
    SENTENCE_SPLIT,
    TRACE_KEYS,
    Trace,
    late_interaction,
    normalize,
    pack_traces,
    speaks_first_person,
    statements,
    unpack_traces,
)
from lmm.ops import Array, Ops
from lmm.types import Captured, ExtraKV, ModelView

__all__ = ["TraceBank", "TraceBankConfig", "statements"]


@dataclass
class TraceBankConfig(MemoryConfig):
    threshold: float = 0.40  # routing score (weighted mean best cosine) a trace needs to be read
    start_layer: int = 0  # first layer whose attention reads traces; -1: the hooked layer
    routing_layer: int = -1  # layer whose input states route; -1: num_layers // 4
    sentence_threshold: float = 0.28  # ... or the cosine of whole-turn mean states reaches this
    sentence_layer: int = -1  # layer whose input states give the whole-turn means; -1: the hooked layer
    max_query_sentences: int = 4  # the first sentences of a longer message also route on their own
    read_gate: bool = True  # read only for messages that speak in the first person (I, my, me, we ...)
    read_gain: int = 2  # each trace token is read this many times: its attention weight times read_gain
    max_traces: int = 100_000  # past this many, the least recently read traces are dropped (with a notice)
    max_bytes: int = 1 << 30  # the memory's budget for trace data; past it, the same (and the notice says so)
    max_trace_tokens: int = 96  # longer statements are not stored
    dedupe: float = 0.9  # a new statement matching a stored one both ways at >= this replaces it
    write_gate: bool = True  # store only first-person statements (questions removed)
    scaffold: bool = False  # also keep the template's tokens around the statement in the trace
    dtype: str = "float16"  # storage of keys, values and routing states: float16 or float32

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {self.threshold}")
        if self.start_layer < -1:
            raise ValueError(f"start_layer must be >= 0 (or -1 for the hooked layer), got {self.start_layer}")
        if self.routing_layer < -1:
            raise ValueError(f"routing_layer must be >= 0 (or -1 for a quarter depth), got {self.routing_layer}")
        if not -1.0 <= self.sentence_threshold <= 1.0:
            raise ValueError(f"sentence_threshold must be a cosine in [-1, 1], got {self.sentence_threshold}")
        if self.sentence_layer < -1:
            raise ValueError(f"sentence_layer must be >= 0 (or -1 for the hooked layer), got {self.sentence_layer}")
        if self.max_query_sentences < 0:
            raise ValueError(f"max_query_sentences must be >= 0, got {self.max_query_sentences}")
        if self.read_gain < 1:
            raise ValueError(f"read_gain must be >= 1, got {self.read_gain}")
        if self.max_traces < 1:
            raise ValueError(f"max_traces must be >= 1, got {self.max_traces}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_trace_tokens < 4:
            raise ValueError(f"max_trace_tokens must be >= 4, got {self.max_trace_tokens}")
        if not 0.0 <= self.dedupe <= 1.0:
            raise ValueError(f"dedupe must be in [0, 1], got {self.dedupe}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")


@register
class TraceBank(DirectMemory):
    name = "trace_bank"
    config_cls = TraceBankConfig

    def __init__(self, config: MemoryConfig, *, hidden_size: int, ops: Ops, seed: int) -> None:
        super().__init__(config, hidden_size=hidden_size, ops=ops, seed=seed)
        self.cfg: TraceBankConfig = config  # type: ignore[assignment]
        self.model: ModelView | None = None
        self.layer: int | None = None
        self.traces: list[Trace] = []
        self.center: np.ndarray | None = None  # float32 [d]
        self.clock = 0
        self._uids = 0
        self._index: tuple[np.ndarray, np.ndarray] | None = None  # normalised routing states, segment starts
        self._extras: OrderedDict[int, ExtraKV] = OrderedDict()
        self._queries: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._generic: np.ndarray | None = None  # normalised centred routing states of CALIBRATION
        self._sentence_center: np.ndarray | None = None  # mean whole-turn state of CALIBRATION
        self._sentences: np.ndarray | None = None  # normalised centred trace sentence states
        self.last_route: dict[str, Any] | None = None

    # --- layout -------------------------------------------------------------------------------
    def attach(self, model: ModelView, layer: int) -> None:
        self.model, self.layer = model, layer
        n = model.num_layers
        if not 0 <= self.start < n:
            raise ValueError(f"trace_bank start_layer {self.start} is out of range for {n} layers")
        if not 0 <= self.routing < n:
            raise ValueError(f"trace_bank routing_layer {self.routing} is out of range for {n} layers")
        if not 0 <= self.sentence_layer < n:
            raise ValueError(f"trace_bank sentence_layer {self.sentence_layer} is out of range for {n} layers")
        self._extras.clear()
        self._queries.clear()
        self._generic = self._sentence_center = self._sentences = None
        if self.traces and self.traces[0].keys.shape[0] != n - self.start:
            raise StateError(f"trace_bank state holds {self.traces[0].keys.shape[0]} layers of keys, "
                             f"this model reads {n - self.start}")

    def _or_hooked(self, layer: int) -> int:
        """A configured layer, or the hooked one for -1."""
        if layer >= 0:
            return layer
        if self.layer is None:
            raise RuntimeError("trace_bank is not attached to a backend")
        return self.layer

    @property
    def start(self) -> int:
        return self._or_hooked(self.cfg.start_layer)

    @property
    def routing(self) -> int:
        return self.cfg.routing_layer if self.cfg.routing_layer >= 0 else self._model.num_layers // 4

    @property
    def sentence_layer(self) -> int:
        return self._or_hooked(self.cfg.sentence_layer)

    @property
    def kv_layers(self) -> list[int]:
        return list(range(self.start, self._model.num_layers))

    # --- the forward pass is untouched at the hooked layer ---------------------------------------
    def rewrite(self, hidden: Array, ctx: RewriteContext) -> Array:
        return hidden

    # --- encoding ----------------------------------------------------------------------------------
    @property
    def _model(self) -> ModelView:
        if self.model is None:
            raise RuntimeError("trace_bank is not attached to a model (ChatEngine attaches it)")
        return self.model

    def _turn(self, text: str) -> tuple[list[int], int, list[int]]:
        """Token ids of [system prompt + user turn(text)], the turn's first position, its content positions."""
        turn = self._model.encode_turn(text)
        return turn.ids, turn.start, turn.content

    def _route_states(self, hidden: Array, content: list[int]) -> np.ndarray:
        states = self.ops.to_numpy(hidden).astype(np.float32)
        return states[content] if content else states[-1:]

    def _encode(self, ids: list[int], start: int, content: list[int],
                kv_layers: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray, Captured]:
        """One frozen forward of a turn: its routing states (content tokens entering `routing`), its
        sentence state (mean of the turn entering `sentence_layer`), and the capture itself."""
        cap = self._model.capture(ids, hidden_layers=(self.routing, self.sentence_layer), kv_layers=kv_layers)
        route = self._route_states(cap.hidden[self.routing], content)
        sentence = self.ops.to_numpy(cap.hidden[self.sentence_layer]).astype(np.float32)[start:].mean(axis=0)
        return route, sentence, cap

    def _calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """Routing states (all content tokens) and sentence states of the neutral CALIBRATION
        messages. They depend on the frozen model only, so they are computed once per backend and
        layer pair, not per module (a fresh engine routes at once)."""
        def compute() -> tuple[np.ndarray, np.ndarray]:
            encoded = [self._encode(*self._turn(text))[:2] for text in CALIBRATION]
            return np.concatenate([r for r, _ in encoded]), np.stack([s for _, s in encoded])

        return self._model.memo(("trace_bank.calibration", self.routing, self.sentence_layer), compute)

    def _ensure_center(self) -> np.ndarray:
        if self.center is None:
            self.center = self._calibration()[0].mean(axis=0).astype(np.float32)
        return self.center

    def _ensure_sentence_center(self) -> np.ndarray:
        if self._sentence_center is None:
            self._sentence_center = self._calibration()[1].mean(axis=0)
        return self._sentence_center

    def _token_weights(self, query: np.ndarray) -> np.ndarray:
        """How specific each (normalised, centred) query token is: 1 - its best cosine to any token
        of the generic calibration messages, so "what is my" weighs little and "brother" much."""
        if self._generic is None:
            self._generic = normalize(self._calibration()[0] - self._ensure_center())
        return np.clip(1.0 - (query @ self._generic.T).max(axis=1), 0.0, None)

    def _query_states(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(normalised centred routing states of the content tokens, normalised centred sentence state)."""
        cached = self._queries.get(text)
        if cached is None:
            ids, start, content = self._turn(text)
            cached = self._remember_query(text, *self._encode(ids, start, content)[:2])
        else:
            self._queries.move_to_end(text)
        return cached

    def _remember_query(self, text: str, route: np.ndarray, sentence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cached = (normalize(route - self._ensure_center()), normalize(sentence - self._ensure_sentence_center()))
        self._queries[text] = cached
        while len(self._queries) > 32:
            self._queries.popitem(last=False)
        return cached

    def _sentence_index(self) -> np.ndarray:
        if self._sentences is None:
            stacked = np.stack([t.sentence.astype(np.float32) for t in self.traces])
            self._sentences = normalize(stacked - self._ensure_sentence_center())
        return self._sentences

    def _routing_index(self) -> tuple[np.ndarray, np.ndarray]:
        if self._index is None:
            center = self._ensure_center()
            states = np.concatenate([t.route.astype(np.float32) for t in self.traces])
            starts = np.cumsum([0] + [len(t.route) for t in self.traces[:-1]])
            self._index = (normalize(states - center), starts)
        return self._index

    def scores(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Routing scores of every stored trace for a user message `text`: (token-level, sentence-level),
        each the best over the whole message and its sentences (a question inside a longer message
        routes as it would alone)."""
        if not self.traces:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
        states, starts = self._routing_index()
        parts = [p for p in SENTENCE_SPLIT.split(text.strip()) if p.strip()]
        tokens, sentences = [], []
        for part in [text, *parts[: self.cfg.max_query_sentences]] if len(parts) > 1 else [text]:
            query, sentence = self._query_states(part)
            tokens.append(late_interaction(query, states, starts, self._token_weights(query)))
            sentences.append(self._sentence_index() @ sentence)
        return np.max(tokens, axis=0), np.max(sentences, axis=0)

    # --- write ---------------------------------------------------------------------------------------
    def write(self, messages: Sequence[dict[str, str]], index: int) -> WriteResult:
        text = messages[index]["content"]
        stored = statements(text) if self.cfg.write_gate else text.strip()
        if not stored:
            return WriteResult(note="not stored (no first-person statement)")
        ids, start, content = self._turn(stored)
        if len(ids) - start > self.cfg.max_trace_tokens:
            return WriteResult(note=f"not stored (longer than {self.cfg.max_trace_tokens} tokens)")
        route, sentence, cap = self._encode(ids, start, content, kv_layers=self.kv_layers)
        dtype = np.dtype(self.cfg.dtype)
        keep = np.arange(start, len(ids)) if self.cfg.scaffold or not content else np.asarray(content)
        keys = np.stack([self.ops.to_numpy(cap.kv[i][0])[0][:, keep] for i in self.kv_layers]).astype(dtype)
        values = np.stack([self.ops.to_numpy(cap.kv[i][1])[0][:, keep] for i in self.kv_layers]).astype(dtype)
        trace = Trace(token_ids=np.asarray(ids, dtype=np.int32)[keep], keys=keys, values=values,
                      route=route.astype(dtype), sentence=sentence.astype(dtype), start=start,
                      written=self.clock, used=self.clock, said_at=time.time())
        self.clock += 1
        replaced = self._duplicate_of(trace)
        if replaced is not None:
            del self.traces[replaced]
        dropped = self._add(trace)
        self._remember_query(stored, route, sentence)  # asking the statement back routes at once
        verb = "replaced a trace with" if replaced is not None else "stored"
        return WriteResult(stored=[stored], note=f"{verb}: {stored}", dropped=dropped)

    def _duplicate_of(self, trace: Trace) -> int | None:
        if not self.traces:
            return None
        center = self._ensure_center()
        new = normalize(trace.route.astype(np.float32) - center)
        states, starts = self._routing_index()
        forward = late_interaction(new, states, starts)
        best = int(np.argmax(forward))
        old = states[starts[best]: starts[best] + len(self.traces[best].route)]
        backward = float(late_interaction(old, new, np.zeros(1, dtype=np.int64))[0])
        return best if min(float(forward[best]), backward) >= self.cfg.dedupe else None

    def _add(self, trace: Trace) -> list[str]:
        """Store `trace`; past `max_traces` or `max_bytes`, drop the least recently read (then oldest)
        other traces, and return their statements."""
        self._uids += 1
        trace.uid = self._uids
        self.traces.append(trace)
        dropped = []
        total = self.stored_bytes()  # once per write; each drop subtracts its own bytes
        while len(self.traces) > 1 and (len(self.traces) > self.cfg.max_traces or total > self.cfg.max_bytes):
            victim = min(range(len(self.traces) - 1), key=lambda i: (self.traces[i].used, self.traces[i].written))
            gone = self.traces.pop(victim)
            total -= _trace_bytes(gone)
            dropped.append(self._text(gone))
        self._index = self._sentences = None
        return dropped

    def items(self) -> list[MemoryItem]:
        ordered = sorted(self.traces, key=lambda t: t.written)
        return [MemoryItem(self._text(t), None if t.said_at != t.said_at else t.said_at, t.used) for t in ordered]

    def forget_item(self, index: int) -> str:
        ordered = sorted(range(len(self.traces)), key=lambda i: self.traces[i].written)
        if not 0 <= index < len(ordered):
            raise ValueError(f"no item {index + 1}: the memory holds {len(ordered)}")
        trace = self.traces.pop(ordered[index])
        self._extras.pop(trace.uid, None)
        self._index = self._sentences = None
        if self.model is not None:
            self.model.read(None)
        return self._text(trace)

    def stored_bytes(self) -> int:
        return sum(_trace_bytes(t) for t in self.traces)

    # --- read ------------------------------------------------------------------------------------------
    def before_reply(self, messages: Sequence[dict[str, str]]) -> None:
        if self.model is None:
            return
        if not self.traces:
            self.model.read(None)
            return
        users = [m["content"] for m in messages if m["role"] == "user"]
        text = users[-1].strip() if users else None
        if text and self.cfg.read_gate and not speaks_first_person(text):
            text = None  # memory of what the user said is read for messages about the user
        self._select(text or None, count_use=True)

    def _select(self, text: str | None, count_use: bool = False) -> None:
        best, score, sentence = None, None, None
        if text and self.traces:
            tokens, sentences = self.scores(text)
            # Read the trace furthest above either threshold: the token-level score catches
            # shared content words, the sentence-level one paraphrases ("I am Ada" / "my name").
            margin = np.maximum(tokens - self.cfg.threshold, sentences - self.cfg.sentence_threshold)
            i = int(np.argmax(margin))
            score, sentence = float(tokens[i]), float(sentences[i])
            if margin[i] >= 0:
                best = i
        self.last_route = {"query": text, "score": score, "sentence_score": sentence, "retrieved": best is not None,
                           "trace": self._text(self.traces[best]) if best is not None else None}
        if best is None:
            self._model.read(None)
            return
        trace = self.traces[best]
        if count_use:
            trace.used = self.clock
            self.clock += 1
        self._model.read(self._extra(trace))

    def _extra(self, trace: Trace) -> ExtraKV:
        extra = self._extras.get(trace.uid)
        if extra is None:
            # Repeating a key k times adds log(k) to its attention logit: a gain without a custom mask.
            gain = self.cfg.read_gain
            layers = {layer: (self.ops.asarray(np.tile(trace.keys[s], (1, gain, 1))[None], dtype="float32"),
                              self.ops.asarray(np.tile(trace.values[s], (1, gain, 1))[None], dtype="float32"))
                      for s, layer in enumerate(self.kv_layers)}
            extra = ExtraKV(key=(id(self), trace.uid), layers=layers, visible_from=trace.start)
            self._extras[trace.uid] = extra
            while len(self._extras) > 8:
                self._extras.popitem(last=False)
        else:
            self._extras.move_to_end(trace.uid)
        return extra

    def reset_session(self) -> None:
        if self.model is not None:
            self.model.read(None)

    # --- reporting ---------------------------------------------------------------------------------------
    def _text(self, trace: Trace) -> str:
        if self.model is None:
            return f"<{len(trace.token_ids)} tokens>"
        return self.model.decode(trace.token_ids.tolist()).strip()

    def summary(self) -> dict[str, Any]:
        n_bytes = self.stored_bytes()
        return {
            "traces": len(self.traces), "max_traces": self.cfg.max_traces,
            "trace_tokens": int(sum(len(t.token_ids) for t in self.traces)), "bytes": int(n_bytes),
            "full": f"{max(len(self.traces) / self.cfg.max_traces, n_bytes / self.cfg.max_bytes):.1%}",
            "threshold": self.cfg.threshold, "last_route": self.last_route,
            "recent": [self._text(t) for t in sorted(self.traces, key=lambda t: -t.used)[:5]],
        }

    # --- state ---------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"buffer.clock": np.asarray([self.clock], dtype=np.int64)}
        if self.center is not None:
            out["buffer.center"] = self.center.astype(np.float32)
        out.update(pack_traces(self.traces))
        return out

    def load_state_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        known = {"buffer.clock", "buffer.center", "buffer.said_at", *(f"buffer.{k}" for k in TRACE_KEYS)}
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise StateError(f"unexpected tensor(s) {', '.join(unknown)} in state for module {self.name}")
        if "buffer.clock" not in tensors:
            raise StateError(f"state is missing tensor buffer.clock for module {self.name}")
        center = tensors.get("buffer.center")
        if center is not None and center.shape != (self.hidden_size,):
            raise StateError(f"tensor buffer.center has shape {center.shape}, module {self.name} expects "
                             f"({self.hidden_size},)")
        traces = unpack_traces(tensors, self.hidden_size, self.name)
        self.traces = []
        for trace in traces:
            self._uids += 1
            trace.uid = self._uids
            self.traces.append(trace)
        self.center = None if center is None else np.asarray(center, dtype=np.float32)
        self.clock = int(tensors["buffer.clock"][0])
        self._index = self._sentences = None
        self._generic = None
        self._extras.clear()
        self._queries.clear()


def _trace_bytes(trace: Trace) -> int:
    return int(trace.keys.nbytes + trace.values.nbytes + trace.route.nbytes + trace.sentence.nbytes
               + trace.token_ids.nbytes)
