"""`trace_bank`: what the user said, kept as compact traces that the model's attention reads.

Owns the trace store and its two halves. Write (`write`, after each user message): the message is
split into sentences; questions are dropped, and the write gate (a probe on the frozen model's own
states, `lmm.memory.trace_gate`) keeps the sentences that tell something, without the leading comma
clauses it rejects (a greeting: "Hi, I'm Ada." is kept as "I'm Ada."). Each kept sentence runs
once through the frozen model as the only user turn and becomes a trace: its token ids and two
routing keys (content-token states entering `routing_layer`, the turn's mean state entering
`sentence_layer`). A restatement replaces its twin; a correction is decided when a reply would
read both statements, where the message says what they are about. Read (`before_reply`): the
last user message, whatever its wording, is routed in two stages (`lmm.memory.trace_routing`);
the few traces it reads (with `read_neighbours`, also those stored next to them from the same
message), within a token budget, are rendered as one user turn (the user's role kept), placed by
RoPE right before the chat's first turn, where an earlier exchange would sit, and handed to the
model as extra keys/values of every layer from `start_layer`, each token `read_gain` times. With
none read (something never told), replies are the plain model's, bit for bit. Nothing is forgotten
by accident: past `max_traces` (100,000) or the disk budget `max_bytes`, the least recently read
traces go, and the write says which.

It does not own the routing arithmetic or the state packing (`lmm.memory.traces`), the write gate's
probe (`lmm.memory.trace_gate`), nor how the model reads extra keys/values (the backends). How the
defaults were chosen, with the development-set figures: `docs/trace_bank.md`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from lmm.memory.base import (
    DirectMemory,
    MemoryConfig,
    MemoryItem,
    ReadItem,
    RewriteContext,
    StateError,
    WriteResult,
)
from lmm.memory.registry import register
from lmm.memory.trace_gate import gate_score, is_question, sentences
from lmm.memory.trace_routing import TraceRouting
from lmm.memory.trace_store import TraceStore
from lmm.memory.traces import (
    OPTIONAL_KEYS,
    RETIRED_KEYS,
    TRACE_KEYS,
    Lru,
    Trace,
    late_interaction,
    storage_dtype,
    trace_columns,
)
from lmm.ops import Array, Ops
from lmm.types import ExtraKV, ModelView

__all__ = ["TraceBank", "TraceBankConfig"]


def _first_clause(sentence: str) -> tuple[str, str]:
    """`sentence` split at its first comma (ASCII or full-width): (head, rest); rest "" without one."""
    at = min((i for i in (sentence.find(", "), sentence.find("\uff0c")) if i >= 0), default=-1)
    return (sentence, "") if at < 0 else (sentence[:at], sentence[at + 1:].strip())


@dataclass
class TraceBankConfig(MemoryConfig):
    threshold: float = 0.40  # first stage: token-level score (weighted mean best cosine) ranked from ...
    sentence_threshold: float = 0.28  # ... and whole-turn cosine ranked from this (the margin past either)
    start_layer: int = 0  # first layer whose attention reads traces; -1: the hooked layer
    routing_layer: int = -1  # layer whose input states route; -1: num_layers // 4
    sentence_layer: int = -1  # layer whose input states give the whole-turn means; -1: the hooked layer
    max_query_sentences: int = 4  # the first sentences of a longer message also route on their own
    shortlist: int = 256  # first stage: token-level scores for this many traces of best whole-turn cosine
    candidates: int = 4  # the first stage's best few, which the second stage checks with the model
    check_margin: float = -0.1  # ... those at least this far past the nearer threshold (-2: all of them)
    relevance: float = 0.85  # second stage: a trace is read when its gain + margin_weight * margin reaches this
    margin_weight: float = 2.0  # (gain: mean log-probability gain of the message's tokens after the statement)
    cover_surprisal: float = 0.0  # > 0: not read if a message token stays this surprising (nats) after it ...
    cover_gain: float = 4.0  # ... and gains less than this from it (0: off; docs/trace_bank.md, neighbours)
    max_read: int = 3  # traces read for one reply at most
    read_budget: int = 96  # statement tokens read for one reply at most
    read_spread: float = 1.0  # a further trace is read when its relevance is within this of the best's
    read_neighbours: int = 0  # > 0: a read statement brings this many stored from its message on each side
    read_gain: int = 3  # each read token is read this many times: its attention weight times read_gain
    read_role: bool = True  # read the whole user turn placed before the chat (False: the words, at its start)
    write_gate: str = "model"  # model: sentences the probe says inform; all: every sentence but questions
    gate_bias: float = 0.0  # probe score a sentence needs (0: halfway between the examples' classes)
    trim_leading: bool = True  # drop leading comma clauses the write gate rejects ("Hi, I'm Ada." -> "I'm Ada.")
    supersede: float = 0.45  # of two statements one reply reads, a newer scoring >= this against the older ...
    supersede_sentence: float = 0.50  # ... and >= this whole-turn cosine leaves the older out (a correction)
    supersede_gap: float = 0.35  # ... and the newer's relevance is at least the older's minus this
    supersede_on_write: bool = False  # True: also decide that when writing, keeping the older as history only
    dedupe: float = 0.98  # a new statement matching a stored one both ways at >= this overwrites it
    max_traces: int = 100_000  # past this many, the least recently read traces are dropped (with a notice)
    max_bytes: int = 1 << 30  # the memory's budget for trace data; past it, the same (and the notice says so)
    max_trace_tokens: int = 96  # longer sentences are not stored
    dtype: str = "int4"  # routing states: int4 (centred, two per byte), int8 (a scale per row), float16, float32

    RETIRED: ClassVar[tuple[str, ...]] = ("scaffold", "read_gate")  # options of the format-1 traces

    @classmethod
    def upgrade(cls, values: dict[str, Any]) -> dict[str, Any]:
        values = {k: v for k, v in values.items() if k not in cls.RETIRED}
        if isinstance(values.get("write_gate"), bool):  # format 1: a first-person word list, on or off
            values["write_gate"] = "model" if values["write_gate"] else "all"
        return values

    def __post_init__(self) -> None:
        if not -2.0 <= self.check_margin <= 2.0:
            raise ValueError(f"check_margin must be in [-2, 2] (a difference of cosines), got {self.check_margin}")
        for name in ("threshold", "sentence_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a cosine in [-1, 1], got {getattr(self, name)}")
        for name in ("start_layer", "routing_layer", "sentence_layer"):
            if getattr(self, name) < -1:
                raise ValueError(f"{name} must be >= 0 (or -1 for its default), got {getattr(self, name)}")
        for name, low in (("max_query_sentences", 0), ("read_neighbours", 0), ("shortlist", 1), ("candidates", 1),
                          ("max_read", 1), ("read_budget", 1), ("read_gain", 1), ("max_traces", 1), ("max_bytes", 1),
                          ("max_trace_tokens", 4)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("read_spread", "supersede_gap", "cover_surprisal", "cover_gain"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.write_gate not in ("model", "all"):
            raise ValueError(f"write_gate must be 'model' or 'all', got {self.write_gate!r}")
        for name in ("supersede", "supersede_sentence", "dedupe"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.dtype not in ("int4", "int8", "float16", "float32"):
            raise ValueError(f"dtype must be int4, int8, float16 or float32, got {self.dtype!r}")


@register
class TraceBank(TraceRouting, DirectMemory):
    name = "trace_bank"
    config_cls = TraceBankConfig
    maps_state = True  # the traces stay in the state file's mapped pages until touched (`TraceStore`)

    def __init__(self, config: MemoryConfig, *, hidden_size: int, ops: Ops, seed: int) -> None:
        super().__init__(config, hidden_size=hidden_size, ops=ops, seed=seed)
        self.cfg: TraceBankConfig = config  # type: ignore[assignment]
        if self.cfg.dtype == "int4" and hidden_size % 2:
            raise ValueError(f"dtype int4 needs an even hidden size, the model has {hidden_size}")
        self.model: ModelView | None = None
        self.layer: int | None = None
        self.traces = self._empty_store()
        self.center: np.ndarray | None = None  # float32 [d]
        self.clock = 0
        self._keys: Lru[int, np.ndarray] = Lru(1024)  # normalised centred routing states by trace uid
        self._extras: Lru[tuple[int, ...], ExtraKV] = Lru(8)  # read blocks of the last selections
        self._queries: Lru[str, tuple[np.ndarray, np.ndarray]] = Lru(32)
        self._logprobs: Lru[str, np.ndarray] = Lru(32)
        self._generic: np.ndarray | None = None  # normalised centred routing states of CALIBRATION
        self._sentence_center: np.ndarray | None = None  # mean whole-turn state of CALIBRATION
        self._sentences: np.ndarray | None = None  # normalised centred trace sentence states (spare rows)
        self._sentence_rows = 0  # rows of _sentences filled, for traces[:_sentence_rows]
        self.last_route: dict[str, Any] | None = None
        self._read: list[tuple[int, str]] = []  # (written, text) of the traces the last reply read

    def _empty_store(self) -> TraceStore:
        return TraceStore(self.hidden_size, storage_dtype(self.cfg.dtype), quantized=self.cfg.dtype in ("int4", "int8"))

    # --- layout -------------------------------------------------------------------------------
    def attach(self, model: ModelView, layer: int) -> None:
        self.model, self.layer = model, layer
        n = model.num_layers
        for what, value in (("start_layer", self.start), ("routing_layer", self.routing),
                            ("sentence_layer", self.sentence_layer)):
            if not 0 <= value < n:
                raise ValueError(f"trace_bank {what} {value} is out of range for {n} layers")
        self._model_changed()

    def _model_changed(self) -> None:
        """Drop everything computed by the model (a new model, or a new memory for it)."""
        for cache in (self._extras, self._queries, self._logprobs, self._keys):
            cache.clear()
        self._generic = self._sentence_center = None
        self._traces_changed()

    def _traces_changed(self) -> None:
        """Drop the whole-turn index built from the traces (dropped, reordered or loaded)."""
        self._sentences, self._sentence_rows = None, 0

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

    # --- write ---------------------------------------------------------------------------------------
    def write(self, messages: Sequence[dict[str, str]], index: int) -> WriteResult:
        parts = [p for p in sentences(messages[index]["content"]) if not is_question(p)]
        result = WriteResult()
        notes, skipped = [], 0
        now = time.time()  # one message, one time: its sentences never correct one another
        for part in parts:
            part = self._trimmed(part)
            ids, start, content = self._turn(part)
            if len(ids) - start > self.cfg.max_trace_tokens:
                notes.append(f"not stored (longer than {self.cfg.max_trace_tokens} tokens): {part[:40]}...")
                continue
            route, sentence, cap = self._encode(ids, start, content)
            if self.cfg.write_gate == "model":
                score = float(self._probe().score(self._content_mean(cap, content))[0])
                if score < self.cfg.gate_bias:
                    skipped += 1
                    continue
            trace = Trace(token_ids=np.asarray([ids[i] for i in content] or ids[start:], dtype=np.int32),
                          route=route, sentence=sentence, written=self.clock, used=self.clock,
                          said_at=now).stored_as(self.cfg.dtype, self._ensure_center())
            self.clock += 1
            query = self._remember_query(part, route, sentence)  # asking the statement back routes at once
            verb = self._place(trace, *query)
            result.dropped += self._add(trace)
            result.stored.append(part)
            notes.append(f"{verb}: {part}")
        if not result.stored and not notes:
            what = "a question" if parts == [] else "nothing the write gate keeps"
            notes.append(f"not stored ({what})")
        elif skipped:
            notes.append(f"{skipped} other sentence{'s' if skipped > 1 else ''} not stored")
        result.note = "; ".join(notes)
        return result

    def _trimmed(self, sentence: str) -> str:
        """`sentence` without the leading comma clauses the write gate says tell nothing: a greeting or
        filler in front ("Hi, I'm Ottoline.") dilutes what a question routes on ("What is my name?" read
        "I'm Ottoline." but not the whole; docs/trace_bank.md, "Leading clauses")."""
        if not self.cfg.trim_leading or self.cfg.write_gate != "model":
            return sentence
        head, rest = _first_clause(sentence)
        while rest and (not head.strip() or gate_score(self._model, self.sentence_layer, head) < self.cfg.gate_bias):
            sentence = rest[:1].upper() + rest[1:]
            head, rest = _first_clause(sentence)
        return sentence

    def _place(self, trace: Trace, query: np.ndarray, whole: np.ndarray) -> str:
        """Relate a new trace (its normalised routing and sentence states) to the current ones before
        it is added: a restatement overwrites its twin; with `supersede_on_write`, a statement about
        the same thing supersedes the older ones (kept as history)."""
        live = np.flatnonzero(self.traces.current)
        if not len(live):
            return "stored"
        tokens, sentences_ = self._score_states(query, whole)
        best = int(live[np.argmax(tokens[live])])
        old = self._trace_keys(best)
        # Compared as stored: int4 keys keep ~0.95 of a state's cosine with itself, so a float query never
        # reached `dedupe` against its own stored twin and every restatement was kept twice.
        new = self._keys_of(trace)
        zero = np.zeros(1, dtype=np.int64)
        both = min(float(late_interaction(new, old, zero)[0]), float(late_interaction(old, new, zero)[0]))
        if both >= self.cfg.dedupe - 1e-6:  # float rounding: a twin scores 1 - 1e-7
            trace.used = max(trace.used, int(self.traces.used[best]))
            self.traces.drop([best])
            self._traces_changed()
            return "restated"
        if not self.cfg.supersede_on_write:
            return "stored"
        stale = live[(tokens[live] >= self.cfg.supersede) & (sentences_[live] >= self.cfg.supersede_sentence)]
        # superseded traces score -inf from now on (`scores`); nothing cached reads them
        self.traces.set("replaced_by", stale, trace.written)
        if len(stale):
            return "stored (replacing: " + "; ".join(self._text(self.traces[i]) for i in stale) + ")"
        return "stored"

    def _add(self, trace: Trace) -> list[str]:
        """Store `trace`; past `max_traces` or `max_bytes`, drop the least recently read (then oldest)
        other traces, superseded ones first, and return their statements."""
        trace.uid = self.traces.append(trace)
        store, n = self.traces, len(self.traces)
        sizes = store.row_bytes()
        total = int(sizes.sum())
        if n <= self.cfg.max_traces and total <= self.cfg.max_bytes:
            return []  # an append alone extends the index in place
        # superseded first, then least recently read, then oldest; never the new trace
        order = np.lexsort((store.written[:-1], store.used[:-1], store.current[:-1]))
        victims: list[int] = []
        for victim in order.tolist():
            if n - len(victims) <= 1 or (n - len(victims) <= self.cfg.max_traces and total <= self.cfg.max_bytes):
                break
            victims.append(victim)
            total -= int(sizes[victim])
        dropped = [self._text(store[i]) for i in victims]
        store.drop(victims)
        self._traces_changed()
        return dropped

    def items(self) -> list[MemoryItem]:
        ordered = sorted(self.traces, key=lambda t: t.written)
        number = {t.written: i for i, t in enumerate(ordered, start=1)}
        return [MemoryItem(self._text(t), None if t.said_at != t.said_at else t.said_at, t.used,
                           replaced_by=number.get(t.replaced_by)) for t in ordered]

    def last_read(self) -> list[ReadItem]:
        # numbered as `items()` numbers them (oldest first), now: a later /forget renumbers; no sort per reply
        written = self.traces.written
        return [ReadItem(int((written < w).sum()) + 1, text) for w, text in self._read if (written == w).any()]

    def forget_item(self, index: int) -> str:
        ordered = np.argsort(self.traces.written, kind="stable")
        if not 0 <= index < len(ordered):
            raise ValueError(f"no item {index + 1}: the memory holds {len(ordered)}")
        trace = self.traces[int(ordered[index])]
        self.traces.drop([int(ordered[index])])
        # what it had replaced is current again only if nothing newer did
        self.traces.set("replaced_by", np.flatnonzero(self.traces.replaced_by == trace.written), -1)
        self._traces_changed()
        if self.model is not None:
            self.model.read(None)
        return self._text(trace)

    def stored_bytes(self) -> int:
        return int(self.traces.row_bytes().sum())

    # --- read ------------------------------------------------------------------------------------------
    def before_reply(self, messages: Sequence[dict[str, str]]) -> None:
        if self.model is None:
            return
        if not self.traces:
            self._read = []
            self.model.read(None)
            return
        users = [m["content"] for m in messages if m["role"] == "user"]
        text = users[-1].strip() if users else ""
        # A message that asks nothing does not read what the chat's earlier messages said (it is there
        # with the reply to it, which the model then repeats); a question may: the 135M model answers
        # one from a read statement more often than from the chat (docs/trace_bank.md).
        asks = any(is_question(part) for part in sentences(text))
        self._select(text or None, count_use=True, context=() if asks else users[:-1])

    def _select(self, text: str | None, count_use: bool = False, context: Sequence[str] = ()) -> None:
        chosen, relevance = self.route(text, context) if text else ([], {})
        texts = [self._text(self.traces[i]) for i in chosen]
        self.last_route = {"query": text, "retrieved": bool(chosen), "relevance": relevance, "traces": texts}
        self._read = [(int(self.traces.written[i]), t) for i, t in zip(chosen, texts, strict=True)]
        if not chosen:
            self._model.read(None)
            return
        if count_use:
            self.traces.set("used", chosen, self.clock)
            self.clock += 1
        self._model.read(self._extra([self.traces[i] for i in chosen]))

    def _extra(self, chosen: list[Trace]) -> ExtraKV:
        """The chosen statements as one earlier user turn, its keys/values computed by the frozen
        model in one forward (cached for the last few selections)."""
        key = tuple(t.uid for t in chosen)
        extra = self._extras.get(key)
        if extra is not None:
            return extra
        ids, start, content = self._turn(" ".join(self._text(t) for t in chosen))
        if self.cfg.read_role and content:
            # The whole user turn (role marker, words, end of turn), its keys moved to end right
            # before the chat's first turn, where an earlier exchange would sit.
            keep = np.arange(start, len(ids))
            cap = self._model.capture(ids, kv_layers=self.kv_layers, shift=-len(keep))
        else:  # the words alone, at the positions of the chat's first turn (format 1's reading)
            keep = np.asarray(content or [start])
            cap = self._model.capture(ids, kv_layers=self.kv_layers)
        gain = self.cfg.read_gain  # k copies of a key add log(k) to its attention logit
        layers = {}
        for layer in self.kv_layers:
            k, v = (self.ops.to_numpy(x)[0][:, keep] for x in cap.kv[layer])
            layers[layer] = (self.ops.asarray(np.tile(k, (1, gain, 1))[None], dtype="float32"),
                             self.ops.asarray(np.tile(v, (1, gain, 1))[None], dtype="float32"))
        return self._extras.put(key, ExtraKV(key=(id(self), key), layers=layers, visible_from=start))

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
            "traces": len(self.traces), "current": int(self.traces.current.sum()),
            "max_traces": self.cfg.max_traces, "trace_tokens": int(self.traces.token_counts.sum()),
            "bytes": int(n_bytes),
            "full": f"{max(len(self.traces) / self.cfg.max_traces, n_bytes / self.cfg.max_bytes):.1%}",
            "last_route": self.last_route,
            "recent": [self._text(self.traces[int(i)]) for i in np.argsort(-self.traces.used, kind="stable")[:5]],
        }

    # --- state ---------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"buffer.clock": np.asarray([self.clock], dtype=np.int64)}
        if self.center is not None:
            out["buffer.center"] = self.center.astype(np.float32)
        out.update(self.traces.tensors())
        return out

    def load_state_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        known = {"buffer.clock", "buffer.center", "buffer.trace_format",
                 *(f"buffer.{k}" for k in (*TRACE_KEYS, *OPTIONAL_KEYS, *RETIRED_KEYS))}
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise StateError(f"unexpected tensor(s) {', '.join(unknown)} in state for module {self.name}")
        if "buffer.clock" not in tensors:
            raise StateError(f"state is missing tensor buffer.clock for module {self.name}")
        center = tensors.get("buffer.center")
        if center is not None and not bool((np.abs(center) < 1e6).all()):  # a damaged file: routing would overflow
            raise StateError(f"tensor buffer.center holds values past any hidden state's size for module {self.name}")
        if center is not None and center.shape != (self.hidden_size,):
            raise StateError(f"tensor buffer.center has shape {center.shape}, module {self.name} expects "
                             f"({self.hidden_size},)")
        columns = trace_columns(tensors, self.hidden_size, self.name)
        if columns is not None and center is None:
            raise StateError(f"inconsistent trace tensors in state for module {self.name}")
        center = None if center is None else np.asarray(center, dtype=np.float32)
        store = self._empty_store() if columns is None else TraceStore.from_columns(columns, self.hidden_size)
        if store.route_dtype != storage_dtype(self.cfg.dtype):  # another storage (format 1: float16)
            converted = self._empty_store()
            for trace in store:
                converted.append(trace.stored_as(self.cfg.dtype, center))
            store = converted
        self.traces, self.center = store, center
        written = int(store.written.max()) + 1 if len(store) else 0
        self.clock = max(int(tensors["buffer.clock"][0]), written)
        self._model_changed()  # the loaded centre changes every encoded message

