"""Benchmark plumbing: module options from the command line, the shared backend, fresh engines.

Owns how a benchmark or smoke run loads one backend for all its rows and builds a fresh engine
(fresh module, greedy, no logs, synchronous updates) per session on it. Replies, with the
memory or without it (`ChatEngine.respond(memory=False)`), come from the engines. It measures
nothing itself: `lmm.bench.runner` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lmm.backends import DecodingConfig, load_backend
from lmm.backends.base import Backend
from lmm.engine import ChatEngine, EngineConfig
from lmm.memory import get_memory_spec
from lmm.models import resolve_model


def parse_module_options(pairs: Sequence[str], *, scoped: bool) -> dict[str, dict[str, str]] | dict[str, str]:
    """`--mm-opt` values: ``module.key=value`` when `scoped` (the benchmark), else ``key=value``."""
    scoped_out: dict[str, dict[str, str]] = {}
    flat: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--mm-opt expects {'module.key' if scoped else 'key'}=value, got {pair!r}")
        if scoped:
            module, dot, opt = key.partition(".")
            if not dot or not module or not opt:
                raise ValueError(f"--mm-opt expects module.key=value, got {pair!r}")
            get_memory_spec(module)  # unknown module: ValueError naming the registered ones
            scoped_out.setdefault(module, {})[opt.replace("-", "_")] = value.strip()
        else:
            flat[key.replace("-", "_")] = value.strip()
    return scoped_out if scoped else flat


def check_module_options(module: str, options: dict[str, str]) -> None:
    """Fail before a long run when an option is unknown or malformed."""
    get_memory_spec(module).config_cls.from_strings(options)


def load_shared_backend(backend: str, model: str | None, threads: int = 0) -> Backend:
    """Load one backend, the way `ChatEngine` would, to be shared by every engine of a run.

    `threads` > 0 sets torch's intra-op threads (0: torch's default, one per core). On a
    machine shared with other jobs one thread can be several times faster than two: each op
    waits for its slowest thread, and a descheduled thread stalls every step."""
    resolved = resolve_model(model)
    loaded = load_backend(backend, resolved.path, resolved.model_id,
                          local_files_only=Path(resolved.path).is_dir())
    if threads > 0 and loaded.name == "torch":
        import torch

        torch.set_num_threads(threads)
    return loaded


def compute_threads(backend: Backend) -> int | None:
    if backend.name != "torch":
        return None
    import torch

    return int(torch.get_num_threads())


def new_engine(backend: Backend, memory: str, options: dict[str, str] | None, *, max_tokens: int, seed: int,
               learning: bool = True, layer: int | None = None,
               repetition_penalty: float = DecodingConfig.repetition_penalty,
               no_repeat_ngram: int = DecodingConfig.no_repeat_ngram,
               memory_contrast: float = DecodingConfig.memory_contrast, consolidate: bool = False,
               consolidation_options: dict[str, str] | None = None) -> ChatEngine:
    """A fresh engine (fresh module) on an already loaded backend: greedy, no logs, synchronous updates."""
    config = EngineConfig(
        backend=backend.name, memory=memory, memory_options=dict(options or {}), seed=seed, layer=layer,
        decoding=DecodingConfig(strategy="greedy", max_tokens=max_tokens, seed=seed,
                                repetition_penalty=repetition_penalty, no_repeat_ngram=no_repeat_ngram,
                                memory_contrast=memory_contrast),
        activation_log_path=None, log_activations=False, background_updates=False, consolidate=consolidate,
        consolidation_options=dict(consolidation_options or {}),
    )
    engine = ChatEngine(config, backend=backend)
    engine.learning = learning
    return engine
