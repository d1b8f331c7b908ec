"""The README's "Adding a module" example works as written: registered, run by the engine, learning."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_adding_a_module_example_runs(tiny_models, tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("### Adding a module"):text.index("## Benchmarks")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my_module.py").write_text(code)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import my_module  # registers it, as the import in lmm/memory/__init__.py would
        from lmm.backends import DecodingConfig
        from lmm.engine import ChatEngine, EngineConfig
        from lmm.memory import memory_names
        assert "my_module" in memory_names()
        engine = ChatEngine(EngineConfig(model={str(tiny_models["llama"])!r}, backend="torch", memory="my_module",
                                         memory_options={{"width": "4", "lr": "0.01"}}, activation_log_path=None,
                                         decoding=DecodingConfig(max_tokens=4)))
        update = engine.ask("the cat sat on the mat").update
        assert update.loss_after < update.loss, update
        engine.save_memory({str(tmp_path / "m.safetensors")!r})
        print("ok", engine.module.update_count)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok 1"
