"""The fact gate's question map: where a statement's questions lie, predicted from the statement.

Owns a ridge regression from the gate's feature of a statement (the frozen model's mean content state
entering the module's layer) to the feature of a question a user asks about it, fitted once per model
and layer on generic statement / question pairs (`PAIRS`) and kept on disk. A fact gate's route adds
the predicted question to the teacher's questions and the statement: the 135M teacher often asks
off-point questions ("What is my name?" about a move to Ljubljana), and the statement alone lies far
from any question about it (dev: 1 of 32 own questions opened a gate routed by the statement alone;
docs/consolidation.md has the table). It owns no gate or threshold (`lmm.memory.fact_gate` does).

The pairs are written for this map: none is a benchmark or development fact or question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmm.memory.trace_gate import content_states, digest
from lmm.types import ModelView

MAP_VERSION = 1
RIDGE = 0.1  # the penalty, as a share of the statements' mean squared (centred) norm; 0.001-0.5 alike on dev
PAIRS: tuple[tuple[str, str], ...] = (
    ("The spare key is under the blue flowerpot.", "Where is the spare key?"),
    ("My cousin Ignatius lives in Winnipeg.", "Where does my cousin live?"),
    ("Our landlord is called Mr Haverford.", "What is our landlord's name?"),
    ("I started learning the accordion in September.", "Which instrument am I learning?"),
    ("The book club meets on the second Tuesday of each month.", "When does the book club meet?"),
    ("My neighbour's dog is called Pepper.", "Who is Pepper?"),
    ("Hey, I'm Rosalind, I just joined the team.", "What is my name?"),
    ("I keep my passport in the top drawer of the desk.", "Where do I keep my passport?"),
    ("The boiler was serviced in January.", "When was the boiler serviced?"),
    ("My library books are due back on the 9th.", "When are my library books due?"),
    ("I take my blood pressure tablets after dinner.", "When do I take my tablets?"),
    ("The plumber who fixed our sink is called Dariusz.", "Who fixed our sink?"),
    ("My uncle Fergus runs a bakery in Galway.", "What does my uncle do?"),
    ("Our allotment is plot number 23.", "Which plot is our allotment?"),
    ("I water the tomatoes every second evening.", "How often do I water the tomatoes?"),
    ("My godson turns ten in August.", "When does my godson turn ten?"),
    ("The garden shed is painted dark green.", "What colour is the shed?"),
    ("I knit scarves for the local charity shop.", "What do I knit?"),
    ("My pension pot is with a firm called Northgate.", "Which firm holds my pension?"),
    ("Our choir rehearses in St Mary's hall.", "Where does our choir rehearse?"),
    ("I collect vintage postcards of lighthouses.", "What do I collect?"),
    ("The recycling goes out on Wednesday nights.", "When does the recycling go out?"),
    ("My colleague Anneliese sits next to me.", "Who sits next to me?"),
    ("My grandson's school is called Hillcrest Primary.", "Which school does my grandson go to?"),
    ("Our caravan is parked at Loch Ness.", "Where is our caravan?"),
    ("I pay the council tax by direct debit.", "How do I pay the council tax?"),
    ("The spare bulbs are in the hallway cupboard.", "Where are the spare bulbs?"),
    ("My physiotherapist is Dr Okafor.", "Who is my physiotherapist?"),
    ("I'm renovating the attic into a studio.", "What am I doing with the attic?"),
    ("Our family doctor retired in the spring.", "When did our family doctor retire?"),
    ("My stepfather restores old clocks.", "What does my stepfather restore?"),
    ("The car insurance renews on the first of July.", "When does the car insurance renew?"),
    ("I volunteer at the animal shelter on Saturdays.", "Where do I volunteer?"),
    ("My favourite cheese is Comté.", "Which cheese do I like best?"),
    ("The hiking club leader is a woman named Hedda.", "Who leads the hiking club?"),
    ("I keep bees in the back garden.", "What do I keep in the garden?"),
    ("Our wifi router is in the study.", "Where is the router?"),
    ("My aunt Philippa sends me a parcel every Christmas.", "Who sends me a parcel at Christmas?"),
    ("The lawnmower needs a new blade.", "What does the lawnmower need?"),
    ("I was a lifeguard when I was a student.", "What did I do as a student?"),
)


@dataclass(frozen=True)
class QuestionMap:
    """Kernel ridge in its dual form (n pairs, so the stored arrays are [n, d], not [d, d]):
    predict(s) = q_mean + ((s - s_mean) @ statements.T) @ weights."""

    s_mean: np.ndarray  # [d]
    q_mean: np.ndarray  # [d]
    statements: np.ndarray  # [n, d], centred
    weights: np.ndarray  # [n, d]: (K + ridge I)^-1 (questions - q_mean)

    def predict(self, states: np.ndarray) -> np.ndarray:
        """The predicted question feature of each statement feature in `states` ([d] or [m, d])."""
        return self.q_mean + ((np.asarray(states, np.float32) - self.s_mean) @ self.statements.T) @ self.weights


def fit_question_map(statements: np.ndarray, questions: np.ndarray, ridge: float = RIDGE) -> QuestionMap:
    """Ridge regression from `statements` to `questions` (rows paired), the penalty `ridge` times the
    statements' mean squared centred norm (so it means the same for every model's scale)."""
    if statements.shape != questions.shape or statements.ndim != 2 or len(statements) < 2:
        raise ValueError(f"need paired [n >= 2, d] features, got {statements.shape} and {questions.shape}")
    s = statements.astype(np.float64)
    q = questions.astype(np.float64)
    s_mean, q_mean = s.mean(axis=0), q.mean(axis=0)
    sc, qc = s - s_mean, q - q_mean
    kernel = sc @ sc.T
    penalty = ridge * float(np.trace(kernel)) / len(s)
    weights = np.linalg.solve(kernel + penalty * np.eye(len(s)), qc)
    return QuestionMap(*(a.astype(np.float32) for a in (s_mean, q_mean, sc, weights)))


def question_map(model: ModelView, layer: int, pairs: Sequence[tuple[str, str]] = PAIRS) -> QuestionMap:
    """The map of `model` at `layer`, fitted once (80 forwards) and kept on disk under a key naming
    the pairs and this file's version."""
    def fit() -> dict[str, np.ndarray]:
        m = fit_question_map(content_states(model, layer, [s for s, _ in pairs]),
                             content_states(model, layer, [q for _, q in pairs]))
        return {"s_mean": m.s_mean, "q_mean": m.q_mean, "statements": m.statements, "weights": m.weights}

    name = digest([t for pair in pairs for t in pair])
    key = f"fact_gate.question_map.{MAP_VERSION}.layer{layer}.{name}"
    return model.memo(("fact_gate.question_map", layer, name), lambda: QuestionMap(**model.stored(key, fit)))
