"""LoCoMo conversations as an ability benchmark: one speaker plays the user over many sessions.

Owns reading a LoCoMo file (Maharana et al., ACL 2024: `speaker_a`/`speaker_b`, `session_N` lists of
`{"speaker", "dia_id", "text"}`, `qa` with `question`, `answer`, `evidence`, `category`), turning
the chosen speaker's turns into chat sessions (each LoCoMo session one chat session, the memory
carried forward), and the single-hop questions about that speaker's own turns into first-person
cases ("What did Caroline research?" becomes "What did I research?"). An answer passes when it
holds at least half of the gold answer's content words. The data stay with the user: the
benchmark reads the file they point at and copies nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmm.bench.abilities import Case

SINGLE_HOP = 4  # LoCoMo's category number for single-hop questions (its README: 4 single-hop)
_STOP = frozenset("""a an the and or but of to in on at for with by from about into over after before
is are was were be been being do does did has have had it its this that these those as so than then
her his she he they them their our we you your my me i what which who whom when where why how""".split())


def speaker_name(doc: dict, speaker: str) -> str:
    key = {"a": "speaker_a", "b": "speaker_b"}.get(speaker)
    if key is None:
        raise ValueError(f"--speaker must be a or b, got {speaker!r}")
    if not isinstance(doc.get(key), str):
        raise ValueError(f"not a LoCoMo conversation: no {key}")
    return doc[key]


def first_person(question: str, name: str) -> str:
    """`question` about `name` asked by `name` ("Caroline's" -> "my", "does Caroline" -> "do I")."""
    n = re.escape(name.split()[0])
    rules = [
        (rf"\b{n}'s\b", "my"), (rf"\bdoes {n}\b", "do I"), (rf"\bis {n}\b", "am I"), (rf"\bhas {n}\b", "have I"),
        (rf"\b{n} is\b", "I am"), (rf"\b{n} has\b", "I have"), (rf"\b{n} does\b", "I do"),
        (rf"\b(for|to|with|about|of|at|by|from|like|than|\w+ed) {n}\b", r"\1 me"), (rf"\b{n}\b", "I"),
        (r"\b(his|her)\b", "my"), (r"\b(he|she)\b", "I"), (r"\bhim\b", "me"),
    ]
    for pattern, repl in rules:
        question = re.sub(pattern, repl, question)
    return question


def content_words(answer: str) -> tuple[str, ...]:
    words = re.findall(r"[\w'-]+", str(answer).lower())
    kept = tuple(dict.fromkeys(w for w in words if w not in _STOP and (len(w) > 2 or w.isdigit())))
    return kept or tuple(words[:1])


def load_locomo(path: Path, speaker: str) -> tuple[list[list[str]], list[Case]]:
    """The speaker's turns per session, and the single-hop cases about them (first person)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read a LoCoMo conversation ({exc})") from None
    if isinstance(doc, list):  # the combined file: take the first conversation
        doc = doc[0] if doc else {}
    doc = doc.get("conversation", doc) | {"qa": doc.get("qa", [])} if isinstance(doc, dict) else {}
    name = speaker_name(doc, speaker)
    numbered = sorted((int(k.split("_")[1]), v) for k, v in doc.items()
                      if re.fullmatch(r"session_\d+", k) and isinstance(v, list))
    sessions, own = [], set()
    for _, turns in numbered:
        texts = []
        for turn in turns:
            if turn.get("speaker") == name and str(turn.get("text", "")).strip():
                texts.append(turn["text"].strip())
                own.add(turn.get("dia_id"))
        if texts:
            sessions.append(texts)
    if not sessions:
        raise ValueError(f"{path}: {name} says nothing")
    texts = {t.get("dia_id"): t["text"] for _, turns in numbered for t in turns if "text" in t}
    first = name.split()[0]
    cases = []
    for i, qa in enumerate(doc.get("qa", [])):
        evidence = [e for e in qa.get("evidence", []) if isinstance(e, str)]
        if (qa.get("category") != SINGLE_HOP or "answer" not in qa or not evidence
                or not all(e in own for e in evidence) or not re.search(rf"\b{re.escape(first)}\b", qa["question"])):
            continue
        cases.append(Case(name=f"locomo/{i}", ability="locomo", sessions=(), query=first_person(qa["question"], name),
                          expect=content_words(qa["answer"]), evidence=tuple(texts[e] for e in evidence if e in texts),
                          match="half"))
    return sessions, cases
