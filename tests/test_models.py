"""Fast tests for lmm.models: model resolution without any conversion or download."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmm.models import EMBEDDED_MODEL_ID, ModelError, ResolvedModel, resolve_model

REPO_ROOT = Path(__file__).resolve().parent.parent


def _fake_complete_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    return folder


def test_local_dir_is_returned(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    resolved = resolve_model(str(folder), local_files_only=True)
    assert resolved == ResolvedModel(path=folder, model_id="my-model")


def test_local_dir_without_config_raises(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(folder))


def test_unknown_hub_id_with_local_files_only_raises() -> None:
    with pytest.raises(ModelError, match="local-files-only"):
        resolve_model("lmm-tests/no-such-model-xyz", local_files_only=True)


def test_embedded_without_wheel_and_local_files_only_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMM_ARTIFACTS", str(tmp_path))
    with pytest.raises(ModelError, match="wheel"):
        resolve_model(None, local_files_only=True, progress=False)
    assert not (tmp_path / "models" / EMBEDDED_MODEL_ID).exists()


def test_embedded_complete_folder_is_fast_and_imports_no_torch(tmp_path: Path) -> None:
    folder = _fake_complete_model(tmp_path / "models" / EMBEDDED_MODEL_ID)
    code = (
        "import sys\n"
        "from lmm.models import resolve_model\n"
        "r = resolve_model(None, local_files_only=True)\n"
        "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(r.path, r.model_id)\n"
    )
    env = {**os.environ, "LMM_ARTIFACTS": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(folder), EMBEDDED_MODEL_ID]
