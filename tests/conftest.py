"""Shared pytest fixtures, grouped by topic; add new groups as their own section below."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lmm.testing import FAMILIES, tiny_model_dir

# --- backends -------------------------------------------------------------------------------------

#: Parametrize a test over both backends; the mlx one carries the `mlx` marker (skipped below).
BACKEND_PARAMS = ("torch", pytest.param("mlx_lm", marks=pytest.mark.mlx))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The one place that skips mlx tests where mlx or mlx-lm is missing."""
    if importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None:
        return
    skip = pytest.mark.skip(reason="mlx and mlx-lm are not installed (pip install 'mlx[cpu]' mlx-lm)")
    for item in items:
        if item.get_closest_marker("mlx"):
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """mlx 0.32 needs its streams cleared before the interpreter exits, or the process may abort."""
    import sys

    if "mlx.core" in sys.modules:
        sys.modules["mlx.core"].synchronize()
        sys.modules["mlx.core"].clear_streams()


@pytest.fixture(params=["torch", pytest.param("mlx_lm", marks=pytest.mark.mlx)])
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once per backend."""
    return request.param

# --- the on-disk cache of per-model arrays (lmm.model_cache) -------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the run (the chats the tests start inherit it), never the user's artifacts/cache."""
    import os

    from lmm.model_cache import CACHE_ENV

    path = tmp_path_factory.mktemp("model_cache")
    os.environ[CACHE_ENV] = str(path)
    return path

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


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct, converted into artifacts/models on first use (about 20 s)."""
    from lmm.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_backend(tiny_models: dict[str, Path]):
    """`tiny_backend(backend_name, family)`: one loaded backend per pair for the whole run, handed
    out with no hook and an empty session cache."""
    from lmm.backends import load_backend

    cache: dict[tuple[str, str], object] = {}

    def get(name: str, family: str = "llama"):
        key = (name, family)
        if key not in cache:
            cache[key] = load_backend(name, tiny_models[family], f"tiny-{family}")
        backend = cache[key]
        backend.remove_hook()
        backend.reset_session()
        return backend

    return get
