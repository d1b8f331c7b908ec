"""`trace_bank`'s write gate: which sentences of a user message inform, decided by the model.

Owns the split of a message into sentences (punctuation only), the labelled example sentences
and the linear probe fitted on them. A sentence is stored when the frozen model's own mean
state of it, projected on the direction that separates the examples that tell something about
the user's world ("The spare key is under the blue flowerpot.", "Our landlord is called ...")
from those that don't (greetings, thanks, small talk, requests), scores above the probe's
threshold. Questions (a sentence ending in a question mark) are never stored.

The probe is fitted once per loaded model (shrinkage LDA on the examples' states), so it carries
no English word list and works on any model the chat runs; the examples mix grammatical persons,
topics and a few languages. It holds no model code: `trace_bank` encodes and asks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmm.types import ModelView

# Part of the keys of the arrays kept on disk (gate, calibration): bump it when how a turn is encoded
# or which states are taken changes, so that no process reads arrays computed the old way.
GATE_VERSION = 1

# Sentences that tell something to keep (any person, any topic), written for the probe only:
# none of them is a benchmark fact or shares a benchmark fact's wording.
INFORM = (
    "The spare key is under the blue flowerpot.",
    "Our landlord is a retired pilot called Mr Haverford.",
    "The gate code for the building is 5521.",
    "My cousin Ignatius lives in Winnipeg.",
    "I keep my passport in the top drawer of the desk.",
    "We bought a red caravan last spring.",
    "The book club meets on the second Tuesday of each month.",
    "Remember that the plumber comes on Thursday morning.",
    "Jonas, my flatmate, works night shifts at the bakery.",
    "I started learning the accordion in September.",
    "Our twins were born in Rotterdam.",
    "The printer password is on a note behind the monitor.",
    "My dentist moved her practice to Elm Street.",
    "I broke my left wrist skiing two winters ago.",
    "The boat is moored at pier nine in the harbour.",
    "I'm lactose intolerant, so no cheese for me.",
    "My daughter plays the bassoon in the school orchestra.",
    "Last week I adopted a greyhound called Pickle.",
    "The rent is due on the fifth of every month.",
    "Grandpa Eduardo turns ninety in August.",
    "I went to a pottery workshop yesterday and made a vase.",
    "My username on the forum is quietfox88.",
    "The meeting with the accountant was moved to Monday.",
    "We usually spend Christmas at my in-laws' farm in Kerry.",
    "Ich wohne seit drei Jahren in Graz.",
    "Mi hermana trabaja como enfermera en Sevilla.",
    "Notre voiture est une vieille Renault grise.",
    "My knee surgery is scheduled for the 3rd of May.",
    "The kids' swimming lessons are at the leisure centre on Saturdays.",
    "I've been vegetarian since I was fifteen.",
    "Our Wi-Fi network is called Batcave and the router is in the hall.",
    "My favourite painter is Hilma af Klint.",
    "The wedding will be held at a vineyard near Mendoza.",
    "I finally finished the marathon in four hours and twelve minutes.",
    "Tom owes me forty pounds for the concert tickets.",
    "I take my blood pressure pills every evening.",
    "Hey, I'm Rosalind, I just joined the team.",
    "Good morning, my name is Teodor and I run the bakery downstairs.",
    "Nice to meet you, I'm the new tenant in flat 4B.",
    "Oh, by the way, our flight lands at six in the evening.",
    "Call me Fitz, everyone does.",
    "Greetings from Tallinn, where I've lived since 2019!",
)

# Sentences that don't: greetings, thanks, reactions, small talk, requests, general remarks.
OTHER = (
    "Hello!",
    "Hi there, how are you doing today?",
    "Thanks so much, that was really useful.",
    "Okay, sounds good.",
    "That's fascinating.",
    "Haha, that's a funny one.",
    "Good night!",
    "Please write a short poem about the moon.",
    "Explain it again more simply.",
    "Give me three ideas for a rainy afternoon.",
    "Tell me a joke about cats.",
    "I see what you mean.",
    "Wow, I never knew that.",
    "Let's talk about something else.",
    "Can you make it shorter",
    "Sure, go ahead.",
    "That makes sense to me now.",
    "I'm not sure I understand.",
    "Keep going, I'm listening.",
    "Summarise that in one sentence.",
    "Interesting point, thank you.",
    "Great to hear from you again!",
    "No worries at all.",
    "Translate this into Spanish for me.",
    "Hallo, wie geht's?",
    "Merci beaucoup pour ton aide.",
    "Gracias, eso fue muy útil.",
    "Cool!",
    "Anyway, what do you think",
    "It depends on the situation, I guess.",
    "Oh nice, good for you!",
    "Write a limerick about a teapot.",
    "List some fun facts about space.",
    "Take care and talk soon.",
    "Well, that's life.",
    "Yes, exactly.",
    "Recommend a film for a quiet evening.",
    "Suggest a few names for a new podcast.",
    "Describe a sunset in three words.",
    "Nice to meet you too!",
    "Good morning, hope your day goes well.",
    "Show me an example of a haiku.",
)

# A sentence ends at . ! ? followed by space (or at their full-width forms), unless the next word
# starts lower-case ("mango... no wait") or the period closes an initial or a title ("Mrs. Ng").
_TITLES = ("Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "Prof", "Mt", "No", "vs", "etc")
SENTENCE_SPLIT = re.compile("".join(rf"(?<!\b{t}\.)" for t in _TITLES)
                            + r"(?<!\b[A-Z]\.)(?:(?<=[.!?])\s+(?![a-z])|(?<=[\u3002\uff01\uff1f])\s*)")
_QUESTION_END = re.compile(r"[?\uff1f][\"'\u201d\u2019)\]]*$")


def sentences(text: str) -> list[str]:
    """`text` split after sentence-ending punctuation (empty pieces dropped)."""
    return [s.strip() for s in SENTENCE_SPLIT.split(text.strip()) if s.strip()]


def is_question(sentence: str) -> bool:
    return bool(_QUESTION_END.search(sentence.strip()))


@dataclass(frozen=True)
class Probe:
    """A linear score on mean states: `(state - center) @ direction`, >= 0 means "informs"."""

    direction: np.ndarray  # [d]
    center: np.ndarray  # [d]: the point between the two classes' means on the direction

    def score(self, states: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(states) - self.center) @ self.direction


def fit_probe(inform: np.ndarray, other: np.ndarray, shrinkage: float = 0.5) -> Probe:
    """Shrinkage LDA: direction Σ⁻¹(μ₁ - μ₀) with Σ the pooled covariance shrunk toward its mean
    variance (few examples, many dimensions); threshold halfway between the projected means."""
    mu1, mu0 = inform.mean(axis=0), other.mean(axis=0)
    centred = np.concatenate([inform - mu1, other - mu0])
    cov = centred.T @ centred / max(len(centred) - 2, 1)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / d * np.eye(d)
    direction = np.linalg.solve(cov, mu1 - mu0)
    direction /= max(float(np.sqrt((mu1 - mu0) @ direction)), 1e-9)  # projected class means at ±1/2
    return Probe(direction=direction.astype(np.float32), center=((mu1 + mu0) / 2).astype(np.float32))


def content_state(model: ModelView, layer: int, text: str) -> np.ndarray:
    """The gate's feature of `text` as the only user turn: its content tokens' mean state entering `layer`."""
    turn = model.encode_turn(text)
    states = model.ops.to_numpy(model.capture(turn.ids, hidden_layers=(layer,)).hidden[layer]).astype(np.float32)
    return states[turn.content].mean(axis=0) if turn.content else states[-1]


def content_states(model: ModelView, layer: int, texts: Sequence[str]) -> np.ndarray:
    """`content_state` of each of `texts`, stacked: [len(texts), d]."""
    return np.stack([content_state(model, layer, t) for t in texts])


def gate_probe(model: ModelView, layer: int) -> Probe:
    """The write gate of `model` at `layer`, fitted once per model on the labelled examples (84
    forwards) and kept on disk: the key names the examples and the feature's version."""
    def fit() -> dict[str, np.ndarray]:
        probe = fit_probe(content_states(model, layer, INFORM), content_states(model, layer, OTHER))
        return {"direction": probe.direction, "center": probe.center}

    key = f"trace_bank.gate.{GATE_VERSION}.layer{layer}.{digest(INFORM + OTHER)}"
    return model.memo(("trace_bank.gate", layer), lambda: Probe(**model.stored(key, fit)))


def digest(texts: Sequence[str]) -> str:
    """A short name for a list of texts (part of a cache key: other texts, another key)."""
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]


def gate_score(model: ModelView, layer: int, text: str) -> float:
    """How much `text` tells something (>= 0: it does, as the examples that inform)."""
    return float(gate_probe(model, layer).score(content_state(model, layer, text))[0])
