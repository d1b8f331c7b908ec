"""Backend registry with lazy imports: choosing torch never imports mlx, and vice versa."""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

from lmm.backends.base import Backend, BackendError, DecodingConfig

BACKENDS = ("mlx_lm", "torch")

__all__ = ["BACKENDS", "Backend", "BackendError", "DecodingConfig", "load_backend", "one_numpy_thread",
           "resolve_backend_name"]


def resolve_backend_name(name: str) -> str:
    """`auto` is mlx_lm on Apple Silicon (when installed) and torch elsewhere."""
    if name == "auto":
        apple = sys.platform == "darwin" and platform.machine() == "arm64"
        return "mlx_lm" if apple and importlib.util.find_spec("mlx_lm") else "torch"
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    return name


def one_numpy_thread() -> None:
    """Give numpy's own BLAS one thread for the rest of the process. The memory modules' numpy work
    is small matrices between model forwards, and a second pool spinning one thread per core next to
    the backend's stalls every forward (on 2 cores a trace write took 194 ms instead of 102)."""
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    site = Path(importlib.util.find_spec("numpy").origin).parent.parent
    own = [lib.filepath for lib in controller.lib_controllers  # numpy.libs/ (Linux), numpy/.dylibs/ (macOS)
           if lib.user_api == "blas" and Path(lib.filepath).is_relative_to(site)
           and Path(lib.filepath).relative_to(site).parts[0].startswith("numpy")]
    if own:
        controller.select(filepath=own).limit(limits=1)


def load_backend(name: str, model_path: Path, model_id: str, *, device: str = "auto", dtype: str = "auto",
                 local_files_only: bool = True) -> Backend:
    name = resolve_backend_name(name)
    one_numpy_thread()
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
