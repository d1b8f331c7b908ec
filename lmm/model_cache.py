"""Arrays that depend on the frozen model only, kept on disk between processes.

Owns where they live (`$LMM_CACHE`, default `artifacts/cache/`), the model fingerprint that keys them
(model id, backend, precision, and the name, size and modification time of every file of the model
folder), and reading/writing them safely: written to a temporary file and renamed into place, a file
that cannot be read is computed again and replaced, and a cache that cannot be written is skipped.
It does not know what the arrays are: callers (trace_bank's write gate and routing calibration)
choose the keys, and a key must change whenever what it computes changes.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lmm.models import artifacts_dir

CACHE_ENV = "LMM_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or artifacts_dir() / "cache")


def model_fingerprint(model_path: Path | None, model_id: str, backend: str, precision: str) -> str | None:
    """A short digest naming one loaded model exactly (None: no folder, nothing is cached)."""
    if model_path is None or not Path(model_path).is_dir():
        return None
    parts = [model_id, backend, precision]
    for f in sorted(Path(model_path).iterdir()):
        if f.is_file():
            stat = f.stat()
            parts.append(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def cached_arrays(fingerprint: str | None, key: str,
                  compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays stored under (`fingerprint`, `key`), computed and stored if absent or unreadable."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file, save_file

    if fingerprint is None:
        return compute()
    path = cache_root() / fingerprint / (re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".safetensors")
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            pass  # damaged or half-written by an older version: computed again and replaced below
    arrays = compute()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk: the arrays serve this process only
        if tmp.is_file():
            tmp.unlink()
    return arrays
