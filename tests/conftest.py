"""Shared pytest fixtures, grouped by topic; add new groups as their own section below."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmm.testing import FAMILIES, tiny_model_dir

# --- tiny random-weight models (lmm.testing) ------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> folder of a tiny float32 model loadable by both transformers and mlx_lm."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: tiny_model_dir(family, root) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def tiny_model(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Path:
    """One tiny model folder per family (test runs once for each of FAMILIES)."""
    return tiny_models[request.param]
