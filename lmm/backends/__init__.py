"""Backend registry with lazy imports: choosing torch never imports mlx, and vice versa."""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

from lmm.backends.base import Backend, BackendError, DecodingConfig

BACKENDS = ("mlx_lm", "torch")

__all__ = ["BACKENDS", "Backend", "BackendError", "DecodingConfig", "load_backend", "resolve_backend_name"]


def resolve_backend_name(name: str) -> str:
    """`auto` is mlx_lm on Apple Silicon (when installed) and torch elsewhere."""
    if name == "auto":
        apple = sys.platform == "darwin" and platform.machine() == "arm64"
        return "mlx_lm" if apple and importlib.util.find_spec("mlx_lm") else "torch"
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    return name


def load_backend(name: str, model_path: Path, model_id: str, *, device: str = "auto", dtype: str = "auto",
                 local_files_only: bool = True) -> Backend:
    name = resolve_backend_name(name)
    if name == "torch":
        from lmm.backends.torch_backend import TorchBackend

        return TorchBackend(model_path, model_id, device=device, dtype=dtype, local_files_only=local_files_only)
    if importlib.util.find_spec("mlx_lm") is None:
        raise BackendError("backend mlx_lm needs the mlx and mlx-lm packages (pip install 'mlx[cpu]' mlx-lm)")
    if device not in ("auto", "cpu", "gpu"):
        raise BackendError(f"--device {device} applies to the torch backend; mlx_lm picks its own device")
    if dtype not in ("auto", "float32"):
        raise BackendError("--dtype applies to the torch backend; mlx_lm uses the folder's dtype")
    from lmm.backends.mlx_backend import MlxBackend

    return MlxBackend(model_path, model_id, local_files_only=local_files_only)
