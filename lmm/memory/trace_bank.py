"""`trace_bank`: what the user said, kept as key/value traces that the upper layers attend to.

Write (`learn`, after each user message): the message's statements (its sentences that are not
questions, when at least one speaks in the first person: the write gate) are run once through
the frozen model as the only user turn after the template's system prompt. The keys and values
of the statement's content tokens (`scaffold`: also the template's tokens around it) at layers
>= `start_layer` (default 0: every layer; measured on a development set of 32 facts with the
right trace forced, reading at every layer recalled 16-17 where layers >= the middle one
recalled 7), with RoPE applied at the positions they were computed at, become one trace,
together with two routing keys: the hidden states entering `routing_layer` (default: a quarter
of the depth) of its content tokens, and the mean state of the turn entering `sentence_layer`
(default: the hooked layer).

Read (`before_generation`, called by the backend before each reply): the last user message of the
prompt is encoded the same way. Each trace gets a token-level score, late interaction (every
query token takes its best cosine over the trace's tokens; the mean is weighted by how unlike
the query token is to every token of built-in neutral sentences, so "what is my" counts little;
states centred by those sentences' mean) and a sentence-level score (cosine of the centred mean
states, which links paraphrases such as "I am Ada" and "what is my name"). A message of several
sentences is also scored sentence by sentence (the best counts). Only messages that speak of
the user (I, my, me, we ...: the read gate) are routed. The trace furthest above `threshold`
or `sentence_threshold` is handed to the backend as extra keys/values: the attention of layers
>= `start_layer` reads them before its own, each token `read_gain` times (default 2: on the
development set 18 of 32 facts and 10 of 10 smoke-test names, against 16 and 7 at 1), seen by
every chat position after the system prompt. Positions are not shifted: the trace overlaps the first chat
positions, relative distances as if the statement opened the chat. With nothing retrieved, the
backend runs its plain path, so replies to unrelated prompts are bit-identical to the model
without memory. The thresholds were chosen on that development set and 67 unrelated prompts
(about 1% of unrelated prompt/trace pairs pass), never on the shipped benchmark scenarios.

Bounded: at most `max_traces` traces (the least recently retrieved, then oldest, is evicted); a
statement whose states match a stored one both ways above `dedupe` replaces it; statements
longer than `max_trace_tokens` are not stored. The state (traces, routing states, token ids,
usage clocks, centring mean) is saved in `dtype` (float16 halves the file).

Limits: one trace per reply (a fact spread over two messages needs both routed), retrieval is
by similarity only (an unrelated prompt that resembles a stored statement reads it), and the
traces assume the template's default system prompt.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmm.backends.attention_memory import Captured, ExtraKV
from lmm.memory.base import (
    LearnBatch,
    LearnResult,
    MemoryConfig,
    MemoryModule,
    RewriteContext,
    StateError,
)
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

__all__ = ["TraceBank", "TraceBankConfig", "statements"]

_MARK = "\u2063TRACE\u2063"
# Per backend (weakly held): calibration states by (routing, sentence) layer; see TraceBank._calibration.
_CALIBRATION: weakref.WeakKeyDictionary[Any, dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]] = (
    weakref.WeakKeyDictionary())


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
    max_traces: int = 256
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
        if self.max_trace_tokens < 4:
            raise ValueError(f"max_trace_tokens must be >= 4, got {self.max_trace_tokens}")
        if not 0.0 <= self.dedupe <= 1.0:
            raise ValueError(f"dedupe must be in [0, 1], got {self.dedupe}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")


class TraceBank(MemoryModule):
    name = "trace_bank"
    config_cls = TraceBankConfig

    def __init__(self, config: MemoryConfig, *, hidden_size: int, ops: Ops, seed: int) -> None:
        super().__init__(config, hidden_size=hidden_size, ops=ops, seed=seed)
        self.cfg: TraceBankConfig = config  # type: ignore[assignment]
        self.backend: Any = None
        self.layer: int | None = None
        self.traces: list[Trace] = []
        self.center: np.ndarray | None = None  # float32 [d]
        self.clock = 0
        self._uids = 0
        self._index: tuple[np.ndarray, np.ndarray] | None = None  # normalised routing states, segment starts
        self._extras: OrderedDict[int, ExtraKV] = OrderedDict()
        self._queries: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._markers: tuple[str, str] | None = None
        self._generic: np.ndarray | None = None  # normalised centred routing states of CALIBRATION
        self._sentence_center: np.ndarray | None = None  # mean whole-turn state of CALIBRATION
        self._sentences: np.ndarray | None = None  # normalised centred trace sentence states
        self.last_route: dict[str, Any] | None = None
        self.last_write: str = ""

    # --- layout -------------------------------------------------------------------------------
    def attach(self, backend: Any, layer: int) -> None:
        self.backend, self.layer = backend, layer
        n = backend.num_layers
        if not 0 <= self.start < n:
            raise ValueError(f"trace_bank start_layer {self.start} is out of range for {n} layers")
        if not 0 <= self.routing < n:
            raise ValueError(f"trace_bank routing_layer {self.routing} is out of range for {n} layers")
        if not 0 <= self.sentence_layer < n:
            raise ValueError(f"trace_bank sentence_layer {self.sentence_layer} is out of range for {n} layers")
        self._extras.clear()
        self._queries.clear()
        self._markers = None
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
        return self.cfg.routing_layer if self.cfg.routing_layer >= 0 else self.backend.num_layers // 4

    @property
    def sentence_layer(self) -> int:
        return self._or_hooked(self.cfg.sentence_layer)

    @property
    def kv_layers(self) -> list[int]:
        return list(range(self.start, self.backend.num_layers))

    # --- the forward pass is untouched at the hooked layer ---------------------------------------
    def rewrite(self, hidden: Array, ctx: RewriteContext) -> Array:
        return hidden

    # --- encoding ----------------------------------------------------------------------------------
    def _turn(self, text: str) -> tuple[list[int], int, list[int]]:
        """Token ids of [system prompt + user turn(text)], the turn's first position, its content positions."""
        turn = self.backend.formatter.user_turn([{"role": "user", "content": text}], 0)
        ids = turn.prefix_ids + turn.turn_ids
        n = len(turn.prefix_ids)
        content = [n + i for i, inside in enumerate(turn.content_mask) if inside]
        if n == 0:  # a template that inserts its own system prompt renders it inside the first turn
            system = self._system_ids()
            if system and ids[: len(system)] == system and len(system) <= (content[0] if content else 0):
                n = len(system)
        return ids, n, content

    def _system_ids(self) -> list[int]:
        """Tokens a template puts before the first user turn on its own (its default system prompt)."""
        fmt = self.backend.formatter
        opening, _ = self._turn_markers()
        rendered = fmt.render([{"role": "user", "content": _MARK}], add_generation_prompt=False)
        at = rendered.rfind(opening) if opening else -1
        return fmt.encode(rendered[:at]) if at > 0 else []

    def _turn_markers(self) -> tuple[str, str]:
        """The text a template puts before and after a user message (found by rendering a marker)."""
        if self._markers is None:
            fmt = self.backend.formatter
            head = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
            before = fmt.render(head, add_generation_prompt=False)
            after = fmt.render([*head, {"role": "user", "content": _MARK}], add_generation_prompt=False)
            turn = after[len(before):] if after.startswith(before) else after
            opening, _, closing = turn.partition(_MARK)
            self._markers = (opening, closing.strip())
        return self._markers

    def _route_states(self, hidden: Array, content: list[int]) -> np.ndarray:
        states = self.ops.to_numpy(hidden).astype(np.float32)
        return states[content] if content else states[-1:]

    def _encode(self, ids: list[int], start: int, content: list[int],
                kv_layers: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray, Captured]:
        """One frozen forward of a turn: its routing states (content tokens entering `routing`), its
        sentence state (mean of the turn entering `sentence_layer`), and the capture itself."""
        cap = self.backend.capture(ids, hidden_layers=(self.routing, self.sentence_layer), kv_layers=kv_layers)
        route = self._route_states(cap.hidden[self.routing], content)
        sentence = self.ops.to_numpy(cap.hidden[self.sentence_layer]).astype(np.float32)[start:].mean(axis=0)
        return route, sentence, cap

    def _calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """Routing states (all content tokens) and sentence states of the neutral CALIBRATION
        messages. They depend on the frozen model only, so they are computed once per backend and
        layer pair, not per module (a fresh engine routes at once)."""
        memo = _CALIBRATION.setdefault(self.backend, {})
        layers = (self.routing, self.sentence_layer)
        if layers not in memo:
            encoded = [self._encode(*self._turn(text))[:2] for text in CALIBRATION]
            memo[layers] = (np.concatenate([r for r, _ in encoded]), np.stack([s for _, s in encoded]))
        return memo[layers]

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
    def learn(self, batch: LearnBatch) -> LearnResult:
        self.update_count += 1
        if self.backend is None:
            raise RuntimeError("trace_bank learns through its backend: attach it first (ChatEngine does)")
        text = batch.messages[batch.index]["content"] if batch.messages else ""
        stored = statements(text) if self.cfg.write_gate else text.strip()
        if not stored:
            self.last_write = "not stored (no first-person statement)"
            return LearnResult(steps=0, losses=[], grad_norms={})
        ids, start, content = self._turn(stored)
        if len(ids) - start > self.cfg.max_trace_tokens:
            self.last_write = f"not stored (longer than {self.cfg.max_trace_tokens} tokens)"
            return LearnResult(steps=0, losses=[], grad_norms={})
        route, sentence, cap = self._encode(ids, start, content, kv_layers=self.kv_layers)
        dtype = np.dtype(self.cfg.dtype)
        keep = np.arange(start, len(ids)) if self.cfg.scaffold or not content else np.asarray(content)
        keys = np.stack([self.ops.to_numpy(cap.kv[i][0])[0][:, keep] for i in self.kv_layers]).astype(dtype)
        values = np.stack([self.ops.to_numpy(cap.kv[i][1])[0][:, keep] for i in self.kv_layers]).astype(dtype)
        trace = Trace(token_ids=np.asarray(ids, dtype=np.int32)[keep], keys=keys, values=values,
                      route=route.astype(dtype), sentence=sentence.astype(dtype), start=start,
                      written=self.clock, used=self.clock)
        self.clock += 1
        replaced = self._duplicate_of(trace)
        if replaced is not None:
            del self.traces[replaced]
        self._add(trace)
        self.last_write = f"{'replaced a trace with' if replaced is not None else 'stored'}: {stored}"
        # The memory now reads this statement back when it is asked about it: route on it (its
        # query states are the ones just computed), so the learner's loss after the update is
        # the loss with the new trace read.
        self._remember_query(stored, route, sentence)
        self._select(stored)
        return LearnResult(steps=0, losses=[], grad_norms={})

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

    def _add(self, trace: Trace) -> None:
        self._uids += 1
        trace.uid = self._uids
        self.traces.append(trace)
        while len(self.traces) > self.cfg.max_traces:
            victim = min(range(len(self.traces)), key=lambda i: (self.traces[i].used, self.traces[i].written))
            del self.traces[victim]
        self._index = self._sentences = None

    # --- read ------------------------------------------------------------------------------------------
    def before_generation(self, prompt_ids: Sequence[int]) -> None:
        if self.backend is None:
            return
        if not self.traces:
            self.backend.set_extra_kv(None)
            return
        text = self._last_user_text(prompt_ids)
        if text and self.cfg.read_gate and not speaks_first_person(text):
            text = None  # memory of what the user said is read for messages about the user
        self._select(text, count_use=True)

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
            self.backend.set_extra_kv(None)
            return
        trace = self.traces[best]
        if count_use:
            trace.used = self.clock
            self.clock += 1
        self.backend.set_extra_kv(self._extra(trace))

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

    def _last_user_text(self, prompt_ids: Sequence[int]) -> str | None:
        """The content of the prompt's last user turn, found with the chat template's own markers."""
        opening, closing = self._turn_markers()
        text = self.backend.formatter.decode(list(prompt_ids), skip_special_tokens=False)
        at = text.rfind(opening) if opening else -1
        if at < 0:
            return None
        body = text[at + len(opening):]
        end = body.find(closing) if closing else -1
        return (body[:end] if end >= 0 else body).strip() or None

    def reset_session(self) -> None:
        if self.backend is not None:
            self.backend.set_extra_kv(None)

    # --- reporting ---------------------------------------------------------------------------------------
    def _text(self, trace: Trace) -> str:
        if self.backend is None:
            return f"<{len(trace.token_ids)} tokens>"
        return self.backend.formatter.decode(trace.token_ids.tolist()).strip()

    def summary(self) -> dict[str, Any]:
        n_bytes = sum(t.keys.nbytes + t.values.nbytes + t.route.nbytes + t.sentence.nbytes + t.token_ids.nbytes
                      for t in self.traces)
        return {
            "traces": len(self.traces), "max_traces": self.cfg.max_traces,
            "trace_tokens": int(sum(len(t.token_ids) for t in self.traces)), "bytes": int(n_bytes),
            "threshold": self.cfg.threshold, "last_route": self.last_route, "last_write": self.last_write,
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
        known = {"buffer.clock", "buffer.center", *(f"buffer.{k}" for k in TRACE_KEYS)}
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
