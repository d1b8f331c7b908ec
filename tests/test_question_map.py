"""The fact gate's question map: the ridge fit itself, and the map fitted on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from lmm.memory.question_map import PAIRS, fit_question_map, question_map


def test_fit_recovers_a_linear_map_and_shrinks_with_the_penalty() -> None:
    rng = np.random.default_rng(0)
    s = rng.standard_normal((30, 8)).astype(np.float32)
    true = rng.standard_normal((8, 8)).astype(np.float32)
    q = s @ true + 3.0
    near = fit_question_map(s, q, ridge=1e-6)
    np.testing.assert_allclose(near.predict(s), q, atol=1e-3)
    np.testing.assert_allclose(near.predict(s[0]), q[0], atol=1e-3)  # one state, not a batch
    # Positive control: a large penalty shrinks every prediction to the questions' mean.
    flat = fit_question_map(s, q, ridge=1e6)
    assert np.abs(flat.predict(s) - q).max() > 1.0
    np.testing.assert_allclose(flat.predict(s), np.broadcast_to(q.mean(axis=0), q.shape), atol=1e-2)


def test_fit_names_bad_shapes() -> None:
    with pytest.raises(ValueError, match="paired"):
        fit_question_map(np.zeros((4, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="paired"):
        fit_question_map(np.zeros((1, 3)), np.zeros((1, 3)))


def test_no_pair_repeats_and_every_question_is_one() -> None:
    assert len({s for s, _ in PAIRS}) == len(PAIRS)
    assert all(q.endswith("?") and not s.endswith("?") for s, q in PAIRS)


@pytest.mark.parametrize("backend_name", ["torch", "mlx_lm"])
def test_the_map_is_fitted_once_and_kept(tiny_backend, backend_name: str) -> None:
    be = tiny_backend(backend_name)
    view = be.view()
    first = question_map(view, 1)
    assert first.statements.shape == (len(PAIRS), be.hidden_size)
    assert question_map(view, 1) is first  # memoised per loaded model
    predicted = first.predict(np.zeros(be.hidden_size, np.float32))
    assert predicted.shape == (be.hidden_size,) and np.isfinite(predicted).all()
