"""The tiny test models load in both backends from one folder and behave identically."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import torch
from mlx_lm.generate import generate_step
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmm.testing import DEFAULT_SYSTEM_PROMPT, FAMILIES, _make_tokenizer, build_tiny_model

MESSAGES = [
    {"role": "user", "content": "Hello! My name is Alice and I live in Paris. What is my name?"},
    {"role": "assistant", "content": "Your name is Alice."},
    {"role": "user", "content": "And where do I live?"},
]

# Both backends run float32 on CPU with different kernels (summation order, fused rms_norm/rope/
# sdpa in mlx), so logits differ by float rounding only. Measured max |torch - mlx| over the
# last-position logits of the 79-token prompt (logit std ~0.5-4): llama 7e-5, qwen2 2e-5,
# qwen3 2e-6, gemma3 1e-6. llama/qwen2 are the largest because their sharp random attention
# amplifies rounding. 1e-3 leaves >10x headroom while any real mismatch (wrong rope_theta, norm
# convention, mask, tied head) shows up far above it: dropping or swapping rope_theta /
# rope_local_base_freq or sliding_window in config.json gave 0.8-10.
LOGIT_ATOL = 1e-3
GEN_TOKENS = 8


@cache
def _backends(path: str) -> tuple[Any, Any, Any, Any]:
    """(hf tokenizer, torch model, mlx model, mlx tokenizer wrapper), loaded once per folder."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    mlx_model, mlx_tokenizer = mlx_lm.load(path)
    return tokenizer, torch_model, mlx_model, mlx_tokenizer


def _prompt_ids(tokenizer: Any) -> list[int]:
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_config_reaches_both_backends(tiny_model: Path) -> None:
    _, torch_model, mlx_model, _ = _backends(str(tiny_model))
    config = json.loads((tiny_model / "config.json").read_text())
    rope = torch_model.config.rope_parameters
    torch_theta = rope.get("full_attention", rope)["rope_theta"]  # gemma3 nests per layer type
    assert config["rope_theta"] == torch_theta == mlx_model.args.rope_theta
    assert len(torch_model.model.layers) == len(mlx_model.model.layers) == 4
    assert torch_model.config.vocab_size == mlx_model.args.vocab_size == len(_make_tokenizer())
    if config["model_type"] == "gemma3_text":
        torch_sliding = [t == "sliding_attention" for t in torch_model.config.layer_types]
        mlx_sliding = [layer.self_attn.is_sliding for layer in mlx_model.model.layers]
        assert torch_sliding == mlx_sliding and any(torch_sliding) and not all(torch_sliding)
        assert mlx_model.args.rope_local_base_freq == rope["sliding_attention"]["rope_theta"]
        assert mlx_model.args.sliding_window == torch_model.config.sliding_window


def test_last_logits_agree(tiny_model: Path) -> None:
    tokenizer, torch_model, mlx_model, mlx_tokenizer = _backends(str(tiny_model))
    ids = _prompt_ids(tokenizer)
    assert list(mlx_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)) == ids
    with torch.no_grad():
        torch_logits = torch_model(torch.tensor([ids])).logits[0, -1].numpy()
    mlx_logits = np.array(mlx_model(mx.array([ids]))[0, -1])
    assert torch_logits.dtype == mlx_logits.dtype == np.float32
    diff = float(np.abs(torch_logits - mlx_logits).max())
    assert diff < LOGIT_ATOL, f"{tiny_model.name}: max |torch - mlx| = {diff:.2e}"
    assert torch_logits.std() > 0.1  # not a degenerate all-equal model


def test_greedy_generation_agrees(tiny_model: Path) -> None:
    tokenizer, torch_model, mlx_model, _ = _backends(str(tiny_model))
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=GEN_TOKENS,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    torch_tokens = out[0, len(ids) :].tolist()
    mlx_tokens = [int(t) for t, _ in generate_step(mx.array(ids), mlx_model, max_tokens=GEN_TOKENS)]
    assert len(torch_tokens) == GEN_TOKENS
    assert torch_tokens == mlx_tokens
    assert len(set(torch_tokens)) > 1  # context-dependent decoding, not one echoed token


def test_chat_template_inserts_default_system_prompt(tiny_model: Path) -> None:
    tokenizer, _, _, mlx_tokenizer = _backends(str(tiny_model))
    user = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert mlx_tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == text
    own = [{"role": "system", "content": "Be brief."}, *user]
    text = tokenizer.apply_chat_template(own, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert mlx_tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_offsets_mapping_and_round_trip(tiny_model: Path) -> None:
    tokenizer, _, _, _ = _backends(str(tiny_model))
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert len(ids) == len(offsets)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))  # contiguous, no gaps
    special = set(tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    for token_id, (start, end) in zip(ids, offsets, strict=True):
        if token_id in special:
            assert text[start:end] == tokenizer.convert_ids_to_tokens(token_id)
    assert tokenizer.decode(ids) == text


def test_tokenizer_identical_in_every_family(tiny_models: dict[str, Path]) -> None:
    """AutoTokenizer swaps in Qwen2Tokenizer for model_type qwen2; it must still tokenize the same."""
    text = "Héllo  wörld!\n\n  It's 2024, café #42 <|im_start|>user\nhi<|im_end|>"
    expected = _make_tokenizer()(text)["input_ids"]
    for family in FAMILIES:
        tokenizer = AutoTokenizer.from_pretrained(tiny_models[family])
        assert tokenizer(text)["input_ids"] == expected, family
        assert tokenizer.decode(expected) == text


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_model("llama", tmp_path / "a", seed=3)
    b = build_tiny_model("llama", tmp_path / "b", seed=3)
    c = build_tiny_model("llama", tmp_path / "c", seed=4)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_unknown_family_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model("gpt2", tmp_path)
