"""The torch backend's own llama-family runtime and tokenizer against transformers'.

`lmm.backends.torch_llama` runs llama, mistral, qwen2 and qwen3 folders and `lmm.chat_tokenizer` reads
their tokenizers without importing transformers (a cold start ~2x faster). They must give what
transformers gives: the same logits, captures, injected-memory forwards and replies, the same ids,
offsets and renderings; families they do not cover (gemma3) load through transformers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmm.backends import DecodingConfig
from lmm.backends.torch_backend import TorchBackend
from lmm.chat_tokenizer import ChatTokenizer, native_reason
from lmm.testing import chat_env, tiny_chat_args
from lmm.types import ExtraKV

NATIVE = ("llama", "qwen2", "qwen3")
MESSAGES = [
    {"role": "user", "content": "the cat sat on the mat and looked at the moon"},
    {"role": "assistant", "content": "the moon was bright"},
    {"role": "user", "content": "what did the cat see"},
]


@pytest.fixture(scope="module")
def pairs(tiny_models: dict[str, Path]) -> dict[str, tuple[TorchBackend, TorchBackend]]:
    """family -> (the default runtime, transformers) on the same folder."""
    return {f: (TorchBackend(tiny_models[f], f), TorchBackend(tiny_models[f], f, runtime="transformers"))
            for f in NATIVE}


def _outputs(backend: TorchBackend) -> list[np.ndarray]:
    """Every path a memory module or a chat takes through the model, as arrays."""
    fmt, ops = backend.formatter, backend.ops
    turn = fmt.standalone_turn("My cat is called Pepper and she likes the moon.")
    question = fmt.generation_ids(MESSAGES)
    layers = [0, backend.num_layers - 1]
    cap = backend.capture(turn.ids, hidden_layers=layers, kv_layers=layers)
    shifted = backend.capture(turn.ids, kv_layers=[1], shift=-3)
    out = [ops.to_numpy(cap.hidden[i]) for i in layers] + [ops.to_numpy(x) for i in layers for x in cap.kv[i]]
    out += [ops.to_numpy(x) for x in shifted.kv[1]]
    out += backend.token_logprobs([question, question[:-4] + turn.ids[-6:]])
    greedy = DecodingConfig(strategy="greedy", max_tokens=8)
    backend.reset_session()
    out.append(np.array(list(backend.generate(question, greedy)), dtype=float))
    backend.install_hook(1, lambda h, ctx: h * 1.5)  # a memory module's hook and its extra keys/values
    backend.set_extra_kv(ExtraKV(key=id(cap), layers={i: cap.kv[i] for i in layers}, visible_from=4))
    try:
        backend.reset_session()
        out.append(np.array(list(backend.generate(question, greedy)), dtype=float))
        out.append(ops.to_numpy(backend.forward_on_prefix(question[:-3], question[-3:], "chat")))
        beam = DecodingConfig(strategy="beam", num_beams=3, max_tokens=6)
        out.append(np.array(list(backend.generate(question, beam)), dtype=float))
    finally:
        backend.set_extra_kv(None)
        backend.remove_hook()
        backend.reset_session()
    return out


@pytest.mark.parametrize("family", NATIVE)
def test_native_runtime_gives_what_transformers_gives(family: str, pairs) -> None:
    """Positive control: one weight of the native model scaled by 1.01 changes the outputs."""
    import torch

    native, reference = pairs[family]
    assert (native.runtime, reference.runtime) == ("lmm", "transformers")
    expected = _outputs(reference)
    got = _outputs(native)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    weight = native.model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.mul_(1.01)
    try:
        native._prefix = None
        changed = _outputs(native)
    finally:
        with torch.no_grad():
            weight.div_(1.01)
        native._prefix = None
    assert any(not np.allclose(a, b, atol=1e-5, rtol=1e-5) if a.shape == b.shape else True
               for a, b in zip(changed, expected, strict=True))


def test_other_families_load_through_transformers(tiny_backend) -> None:
    assert tiny_backend("torch", "gemma3").runtime == "transformers"
    assert tiny_backend("torch", "llama").runtime == "lmm"


@pytest.mark.parametrize("family", ("llama", "gemma3"))
def test_tokenizer_reads_the_folder_as_transformers_does(family: str, tiny_models, tmp_path: Path) -> None:
    """Renderings, ids, offsets, decoding and special tokens equal AutoTokenizer's. Positive control: a
    folder whose tokenizer class transformers rebuilds is handed to transformers."""
    from transformers import AutoTokenizer

    folder = tiny_models[family]
    ours, theirs = ChatTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(str(folder))
    chat = [*MESSAGES, {"role": "assistant", "content": "Zoë's café:  <|im_start|> naïve!\n\n1234"}]
    for prompt in (True, False):
        text = ours.apply_chat_template(chat, add_generation_prompt=prompt)
        assert text == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
    a = ours(text, add_special_tokens=False, return_offsets_mapping=True)
    b = theirs(text, add_special_tokens=False, return_offsets_mapping=True)
    assert a["input_ids"] == list(b["input_ids"]) and a["offset_mapping"] == [tuple(o) for o in b["offset_mapping"]]
    for skip in (True, False):
        assert ours.decode(a["input_ids"], skip) == theirs.decode(a["input_ids"], skip_special_tokens=skip)
    assert sorted(ours.all_special_ids) == sorted(theirs.all_special_ids)
    assert (ours.eos_token_id, ours.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id)
    assert native_reason(folder) is None
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja"):
        (rebuilt / name).write_bytes((folder / name).read_bytes())
    (rebuilt / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    assert "LlamaTokenizer" in native_reason(rebuilt)


@pytest.mark.parametrize("family", ("llama", "gemma3"))
def test_a_llama_family_chat_never_imports_transformers(family: str, tiny_models, tmp_path: Path) -> None:
    """The real entry point, piped, with memory and background updates; nor torch._dynamo, which a
    random init on the meta device pulls in (1.3 s). Positive control: gemma3, which needs
    transformers' implementation, imports both in the same run."""
    args = [*tiny_chat_args(tiny_models, "torch", family), "--memory", "trace_bank", "--json"]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "lmm.chat", *args],
                          input=b"My cat is called Pepper.\nWhat is my cat called?\n", capture_output=True,
                          timeout=240, env=chat_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().count('"assistant"') == 2
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert ("transformers" in imported) == (family == "gemma3")
    assert ("torch._dynamo" in imported) == (family == "gemma3")


ROPE_CASES = {
    "llama3 RoPE": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 256}}),
    "linear RoPE": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    "mistral": ("mistral", {"sliding_window": None}),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_native_runtime_covers_scaled_rope_and_mistral(case: str, tmp_path: Path) -> None:
    """Logits over a prompt and a cached continuation equal transformers' for folders written by it.
    Positive control: the same folder read as default RoPE (its scaling dropped) differs, for the RoPE cases."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmm.backends.torch_llama import load_model

    family, extra = ROPE_CASES[case]
    config = AutoConfig.for_model(family, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    reference.save_pretrained(str(tmp_path))
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))

    def logits(model, **kw) -> np.ndarray:
        with torch.no_grad():
            first = model(input_ids=ids[:, :30], use_cache=True, **kw).logits
            rest = model(input_ids=ids[:, 30:], use_cache=True, **kw).logits
        return torch.cat([first, rest], dim=1).numpy()

    from transformers import DynamicCache

    expected = logits(reference, cache=DynamicCache(config=config))
    native = load_model(tmp_path, torch.float32, torch.device("cpu"))
    np.testing.assert_allclose(logits(native, cache=native.new_cache()), expected, atol=1e-5, rtol=1e-5)
    if case.endswith("RoPE"):
        data = json.loads((tmp_path / "config.json").read_text())
        data["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        (tmp_path / "config.json").write_text(json.dumps(data))
        plain = load_model(tmp_path, torch.float32, torch.device("cpu"))
        assert not np.allclose(logits(plain, cache=plain.new_cache()), expected, atol=1e-5, rtol=1e-5)


def test_what_the_native_runtime_leaves_to_transformers() -> None:
    from lmm.backends.torch_llama import unsupported

    base = {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    assert unsupported(base) is None
    assert "gemma3" in unsupported({**base, "model_type": "gemma3_text"})
    assert "yarn" in unsupported({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    assert "sliding" in unsupported({**base, "model_type": "mistral", "sliding_window": 4096})
    assert unsupported({**base, "model_type": "mistral", "sliding_window": None}) is None
    assert "sliding" in unsupported({**base, "model_type": "qwen2", "use_sliding_window": True})
    assert "partial" in unsupported({**base, "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}})
    assert unsupported({"model_type": "llama", "rope_scaling": {"type": "llama3"}}) is None  # the older spelling
