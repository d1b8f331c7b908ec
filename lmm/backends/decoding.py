"""How a reply's next token is chosen from the model's scores: the decoding settings and the steps
the shared decode loop (`Backend.generate`) applies to each token's logits.

Owns `DecodingConfig` (validated in `__post_init__`), the repetition penalty, the n-gram block,
sampling (numpy, seeded, so both backends sample identically) and the memory contrast (context-aware
decoding against the reply without the memory it read). It runs no model: the loop that feeds it
logits is the backend's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Strategy = Literal["auto", "greedy", "beam", "sample"]


@dataclass
class DecodingConfig:
    strategy: Strategy = "auto"
    deterministic: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    num_beams: int = 4
    seed: int = 0
    # llama.cpp/ollama-style repetition penalty over the reply's last `repeat_last_n` tokens
    # (1.0: off); without it greedy decoding of a small model loops until max_tokens.
    repetition_penalty: float = 1.1
    repeat_last_n: int = 64
    no_repeat_ngram: int = 0  # > 0: a reply never repeats one of its own n-grams of this many tokens
    # While a memory module has the attention read stored keys/values, each token's log-probabilities
    # become (1 + c) * with - c * without the read (context-aware decoding; 0: off), among the tokens
    # at least `contrast_floor` times as likely as the best with the read. docs/trace_bank.md, "Contrast".
    memory_contrast: float = 1.0
    contrast_floor: float = 0.1

    def __post_init__(self) -> None:
        if self.strategy not in ("auto", "greedy", "beam", "sample"):
            raise ValueError(f"strategy must be auto, greedy, beam or sample; got {self.strategy!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.repetition_penalty < 1.0:
            raise ValueError(f"repetition_penalty must be >= 1 (1 turns it off), got {self.repetition_penalty}")
        if self.repeat_last_n < 0:
            raise ValueError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")
        if self.no_repeat_ngram < 0 or self.no_repeat_ngram == 1:
            raise ValueError(f"no_repeat_ngram must be 0 (off) or >= 2, got {self.no_repeat_ngram}")
        if not self.memory_contrast >= 0:
            raise ValueError(f"memory_contrast must be >= 0 (0 turns it off), got {self.memory_contrast}")
        if not 0 < self.contrast_floor <= 1:
            raise ValueError(f"contrast_floor must be in (0, 1], got {self.contrast_floor}")

    def resolved(self, supports_beam: bool) -> Literal["greedy", "beam", "sample"]:
        """The strategy actually run: auto follows --deterministic; beam falls back where unsupported."""
        strategy = self.strategy
        if strategy == "auto":
            strategy = "greedy" if self.deterministic else "sample"
        if strategy == "beam" and not supports_beam:
            strategy = "greedy" if self.deterministic else "sample"
        if strategy == "sample" and self.temperature == 0:
            strategy = "greedy"
        return strategy


def penalize_repeats(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """Make the tokens in `recent` less likely, as llama.cpp does: positive logits divided by
    `penalty`, negative ones multiplied (a copy; `logits` is not changed)."""
    if penalty == 1.0 or not recent:
        return logits
    out = logits.astype(np.float32, copy=True)
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


class NgramBlocker:
    """Bans the token that would repeat one of the reply's own n-grams (transformers'
    no_repeat_ngram_size, over the reply only)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen: dict[tuple[int, ...], set[int]] = {}

    def add(self, reply: Sequence[int]) -> None:
        if self.n and len(reply) >= self.n:
            self.seen.setdefault(tuple(reply[-self.n:-1]), set()).add(reply[-1])

    def block(self, logits: np.ndarray, reply: Sequence[int]) -> np.ndarray:
        banned = self.seen.get(tuple(reply[len(reply) - self.n + 1:])) if self.n and len(reply) >= self.n - 1 else None
        if not banned:
            return logits
        out = logits.astype(np.float32, copy=True)
        out[list(banned)] = -np.inf
        return out


def sample_token(logits: np.ndarray, strategy: str, temperature: float, top_p: float,
                 rng: np.random.Generator) -> int:
    if strategy == "greedy":
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / max(temperature, 1e-6)
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the vocabulary, in float64 for the sum (float32 out)."""
    z = logits.astype(np.float64) - logits.max()
    return (z - np.log(np.exp(z).sum())).astype(np.float32)


def contrast_scores(read: np.ndarray, plain: np.ndarray, strength: float, floor: float) -> np.ndarray:
    """Next-token scores that favour what the memory read changes (Shi et al., arXiv 2305.14739):
    (1 + strength) * log p(read) - strength * log p(plain), over the tokens whose probability with the
    read is at least `floor` times the best one's (the rest -inf), so the contrast only re-ranks tokens
    the reading model itself finds plausible. The plain model's own opening ("I'm sorry, as an AI ...")
    loses to the words the read statement makes likely."""
    with_read, without = log_softmax(read), log_softmax(plain)
    scores = (1.0 + strength) * with_read - strength * without
    return np.where(with_read >= with_read.max() + np.log(floor), scores, -np.inf).astype(np.float32)
