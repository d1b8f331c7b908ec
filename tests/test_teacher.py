"""The teacher (`lmm.teacher`): a question row goes on to its answer in the same batch only when its
tokens are how the answer's prompt encodes; otherwise the question is answered alone. Driven token by
token with scripted scores on the tiny tokenizer; the embedded model's rows are compared with one-at-a-
time generation in tests/test_integration.py."""

from __future__ import annotations

import numpy as np

from lmm.teacher import Teacher, TeacherConfig, _Row, answer_prompt, question_prompt

STATEMENT = "The red kite is in the shed."
CONFIG = TeacherConfig(questions=2, forward_tries=0, temperature=0.8, max_tokens=24, seed=0)


def drive(row: _Row, script: list[int], stop: int, vocab: int) -> list[int]:
    """Feed `row` scores whose best token is the script's next one (then `stop`); return what it fed."""
    fed: list[int] = []
    while len(fed) < 100:
        scores = np.zeros(vocab, dtype=np.float32)
        scores[script[len(fed)] if len(fed) < len(script) else stop] = 10.0
        tok = row.next_token(scores)
        if tok is None:
            return fed
        fed.append(tok)
    raise AssertionError("the row never finished")


def setup(tiny_backend):
    backend = tiny_backend("torch", "llama")
    fmt = backend.formatter
    prompt = fmt.encode(question_prompt(STATEMENT))
    vocab = len(fmt.tokenizer)
    return backend, fmt, prompt, vocab, min(fmt.stop_ids)


def test_a_question_goes_on_to_its_answer_in_the_same_row(tiny_backend) -> None:
    backend, fmt, prompt, vocab, stop = setup(tiny_backend)
    canonical = fmt.encode(answer_prompt(STATEMENT, "Where is the kite?"))
    answer = fmt.encode(" In the shed.")
    rest = canonical[len(prompt):]
    end = next(i for i in range(len(rest)) if "\n" in fmt.decode(rest[: i + 1])) + 1  # the question's line
    junk = fmt.encode(" zebra")[:1] * (len(rest) - end)  # what the scores say while "Answer:" is fed
    row = _Row(backend, STATEMENT, prompt, True, 0, CONFIG)
    fed = drive(row, rest[:end] + junk + answer + fmt.encode("\n"), stop, vocab)
    assert (row.question, row.answer) == ("Where is the kite?", "In the shed.")
    assert prompt + fed == canonical + answer  # "Answer:" fed whatever the scores said; the line's end not fed


def test_rows_that_cannot_go_on_stop_at_the_question(tiny_backend) -> None:
    backend, fmt, prompt, vocab, stop = setup(tiny_backend)
    statement_like = _Row(backend, STATEMENT, prompt, True, 0, CONFIG)
    drive(statement_like, fmt.encode(" The kite is red.\nAnswer: yes\n"), stop, vocab)
    assert (statement_like.question, statement_like.answer) == ("The kite is red.", None)
    # one token per byte is not how the answer's prompt encodes " Where?": answered alone, not in the row
    spelled = [t for ch in " Where?\n" for t in fmt.encode(ch)]
    assert spelled != fmt.encode(" Where?\n")  # the positive control: the tokenizer merges these bytes
    odd = _Row(backend, STATEMENT, prompt, True, 0, CONFIG)
    drive(odd, spelled + fmt.encode(" In the shed.\n"), stop, vocab)
    assert (odd.question, odd.answer) == ("Where?", None)
    answered = Teacher(backend, CONFIG)._answer(odd)  # the fallback: the frozen model answers it alone
    assert isinstance(answered, str) and "\n" not in answered
