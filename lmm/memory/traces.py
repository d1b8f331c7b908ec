"""Trace records for `trace_bank`: the write gate, the routing arithmetic and the state layout.

Owns what a trace is (`Trace`), which text becomes one (`statements`, the write gate), the
late-interaction score, the neutral sentences that centre and weight routing states, and how a
list of traces is packed into / checked and unpacked from flat safetensors tensors. It holds no
model code: encoding text, routing decisions and reading traces live in `trace_bank`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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

_QUESTION_END = re.compile(r"\?[\"'\u201d\u2019)\]]*$")
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_FIRST_PERSON = re.compile(
    r"(?<![\w'])(i|i'm|i've|i'd|i'll|im|my|mine|myself|we|we're|we've|we'd|we'll|our|ours|ourselves)(?![\w'])",
    re.IGNORECASE,
)
_ME = re.compile(r"(?<![\w'])(me|us)(?![\w'])", re.IGNORECASE)


def speaks_first_person(text: str) -> bool:
    """The read gate: does a message speak of its writer (I, my, me, we, our ...)?"""
    text = text.replace("\u2019", "'")
    return bool(_FIRST_PERSON.search(text) or _ME.search(text))


def statements(text: str) -> str:
    """The write gate: `text` without its questions, or "" when nothing left speaks in the first person."""
    text = text.replace("\u2019", "'").strip()
    kept = [s for s in SENTENCE_SPLIT.split(text) if s.strip() and "?" not in s and not _QUESTION_END.search(s)]
    if not kept or not any(_FIRST_PERSON.search(s) for s in kept):
        return ""
    return " ".join(s.strip() for s in kept)


@dataclass
class Trace:
    token_ids: np.ndarray  # int32 [L]: the trace's tokens (content only, or the whole user turn)
    keys: np.ndarray  # [S, n_kv_heads, L, head_dim] for the layers start_layer..num_layers-1
    values: np.ndarray  # same shape
    route: np.ndarray  # [R, d] routing states of the content tokens
    sentence: np.ndarray  # [d] mean state of the user turn entering sentence_layer
    start: int  # position of the first trace token (= the system prompt's length)
    written: int  # clock at writing
    used: int  # clock at the last retrieval (written, until retrieved)
    said_at: float = float("nan")  # when the user said it (Unix time; NaN in files older than this field)
    uid: int = 0  # in-process identity (caches), not saved


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


TRACE_KEYS = ("keys", "values", "route", "sentence", "token_ids", "trace_tokens", "route_tokens", "starts",
              "written", "used")


def pack_traces(traces: list[Trace]) -> dict[str, np.ndarray]:
    """The traces as flat `buffer.*` tensors (empty dict for no traces)."""
    if not traces:
        return {}
    t = traces
    return {
        "buffer.keys": np.concatenate([x.keys for x in t], axis=2),
        "buffer.values": np.concatenate([x.values for x in t], axis=2),
        "buffer.route": np.concatenate([x.route for x in t]),
        "buffer.sentence": np.stack([x.sentence for x in t]),
        "buffer.token_ids": np.concatenate([x.token_ids for x in t]),
        "buffer.trace_tokens": np.asarray([len(x.token_ids) for x in t], dtype=np.int32),
        "buffer.route_tokens": np.asarray([len(x.route) for x in t], dtype=np.int32),
        "buffer.starts": np.asarray([x.start for x in t], dtype=np.int32),
        "buffer.written": np.asarray([x.written for x in t], dtype=np.int64),
        "buffer.used": np.asarray([x.used for x in t], dtype=np.int64),
        "buffer.said_at": np.asarray([x.said_at for x in t], dtype=np.float64),
    }


def unpack_traces(tensors: dict[str, np.ndarray], hidden_size: int, module: str) -> list[Trace]:
    """Traces from `pack_traces` output; StateError naming the problem when the tensors disagree."""
    present = [k for k in TRACE_KEYS if f"buffer.{k}" in tensors]
    if present and len(present) != len(TRACE_KEYS):
        missing = sorted(set(TRACE_KEYS) - set(present))
        raise StateError(f"state is missing tensor(s) {', '.join('buffer.' + k for k in missing)} "
                         f"for module {module}")
    center = tensors.get("buffer.center")
    traces: list[Trace] = []
    if present:
        g = {k: tensors[f"buffer.{k}"] for k in TRACE_KEYS}
        lens, rlens, n = g["trace_tokens"], g["route_tokens"], len(g["trace_tokens"])
        ok = (g["keys"].ndim == 4 and g["keys"].shape == g["values"].shape
              and g["keys"].shape[2] == int(lens.sum()) == len(g["token_ids"])
              and g["route"].ndim == 2 and g["route"].shape == (int(rlens.sum()), hidden_size)
              and g["sentence"].shape == (n, hidden_size)
              and all(len(g[k]) == n for k in ("route_tokens", "starts", "written", "used"))
              and (lens > 0).all() and (rlens > 0).all() and center is not None)
        if not ok:
            raise StateError(f"inconsistent trace tensors in state for module {module}")
        edges, redges = np.cumsum(lens)[:-1], np.cumsum(rlens)[:-1]
        parts = zip(np.split(g["keys"], edges, axis=2), np.split(g["values"], edges, axis=2),
                    np.split(g["route"], redges), np.split(g["token_ids"], edges), strict=True)
        said = tensors.get("buffer.said_at")  # optional: files written before it was kept have none
        if said is not None and said.shape != (n,):
            raise StateError(f"inconsistent trace tensors in state for module {module}")
        for i, (k, v, r, ids) in enumerate(parts):
            traces.append(Trace(token_ids=ids, keys=k, values=v, route=r, sentence=g["sentence"][i],
                                start=int(g["starts"][i]), written=int(g["written"][i]), used=int(g["used"][i]),
                                said_at=float(said[i]) if said is not None else float("nan")))
    return traces
