"""Tiny random-weight model folders for fast tests, loadable by both backends from one folder.

Owns: the offline test tokenizer (byte-level BPE trained in-process on built-in text, ChatML
template that inserts a default system prompt), tiny deterministic float32 models of FAMILIES, and
a per-root build cache. A folder (config.json, model.safetensors, tokenizer files) loads with
``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` and with ``mlx_lm.load``.
Does not own: backends, generation, memory, the real embedded model (``lmm.models``).
torch/transformers/tokenizers are imported only inside the builders.

mlx_lm needs config keys transformers 5 does not write: it nests RoPE under ``rope_parameters``,
while mlx_lm's llama/qwen2/gemma3_text ModelArgs read top-level ``rope_theta`` (gemma3 also
``rope_local_base_freq`` and ``sliding_window_pattern``; it ignores ``layer_types``) and silently
use their own defaults otherwise; gemma3's default pattern 6 even crashes a 4-layer model.
llama, qwen2, gemma3 tie embeddings (no ``lm_head.weight`` saved; mlx ``sanitize`` copes); qwen3
is untied so the ``lm_head`` path is covered too.

Decoder layers (transformers 5.24 / mlx-lm 0.32), same for all four families:
  * torch: ``model.model.layers`` (``nn.ModuleList``); a layer's forward returns a plain
    ``torch.Tensor`` of hidden states, not a tuple (gemma3's return annotation still says tuple).
  * mlx: ``model.model.layers`` (a Python list), also exposed as the ``model.layers`` property; a
    layer's ``__call__(x, mask, cache)`` returns an ``mx.array``. For qwen2, ``model.layers`` is
    ``model.model.pipeline_layers``, a fresh slice, so replace layers via ``model.model.layers``.
    mlx llama's model loop reads ``layer.use_sliding``, so a wrapping layer must expose it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")

DEFAULT_SYSTEM_PROMPT = "You are a tiny test assistant."
BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, IM_END)
VOCAB_TARGET = 640

_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML like SmolLM2's: a default system turn is inserted when the first message is not one.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = """\
The small robot lived in a quiet house at the end of a long road. Every morning it opened the
windows, watered the plants and made tea for the old woman who lived there. She told it stories
about the sea, the mountains and the city where she was born. The robot liked the stories about
the sea the most, because the sea was always moving and always the same.
My name is Alice and I live in Paris. I have a brother called Tom and a sister called Anna. We
like to walk in the park on Sunday, read books in the evening and cook dinner together. My
favourite colour is blue, my favourite food is bread with cheese, and my cat is called Pepper.
Hello! How are you today? I am fine, thank you. What would you like to talk about? Can you
remember what I told you yesterday? Yes, you said that you wanted to learn to play the piano and
that your teacher lives near the river. Please tell me more about your week and your plans.
Memory is the ability to keep information over time. People remember names, places, numbers and
feelings. A good assistant answers questions clearly, says when it does not know something, and
keeps the conversation friendly. Water boils at one hundred degrees. The sun rises in the east and
sets in the west. There are seven days in a week and twelve months in a year.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 2024. Punctuation: , . ; : ! ? ' " ( ) - _ / @ #.
"""

# Gemma3: alternate sliding/global so a 4-layer model has both kinds; a short window so the test
# prompt (longer than it) really exercises the sliding mask and mlx's RotatingKVCache.
_GEMMA3_PATTERN = 2
_GEMMA3_WINDOW = 16
_ROPE_THETA = {"llama": 100_000.0, "qwen2": 1_000_000.0, "qwen3": 1_000_000.0, "gemma3": 1_000_000.0}
_GEMMA3_LOCAL_THETA = 10_000.0


def _make_tokenizer() -> Any:
    """Train a tiny byte-level BPE in-process and wrap it for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # The exact pipeline transformers' Qwen2Tokenizer rebuilds around tokenizer.json's vocab/merges:
    # AutoTokenizer forces that class for model_type "qwen2" whatever tokenizer_config.json says, so
    # any other pipeline would tokenize differently in the qwen2 folder than in the others.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        pad_token=BOS_TOKEN,
        unk_token=BOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tokenizer(dest: Path) -> None:
    """Write the tiny test tokenizer (tokenizer.json, tokenizer_config.json, template) into dest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _make_tokenizer().save_pretrained(str(dest))


def _config(family: str, vocab_size: int, ids: dict[str, int]) -> Any:
    from transformers import AutoConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=family != "qwen3",
        dtype="float32",
        **ids,
    )
    theta = _ROPE_THETA[family]
    if family == "gemma3":
        return AutoConfig.for_model(
            "gemma3_text",
            **common,
            layer_types=[
                "full_attention" if (i + 1) % _GEMMA3_PATTERN == 0 else "sliding_attention"
                for i in range(common["num_hidden_layers"])
            ],
            sliding_window=_GEMMA3_WINDOW,
            sliding_window_pattern=_GEMMA3_PATTERN,
            query_pre_attn_scalar=common["head_dim"],
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_THETA},
            },
        )
    rope = {"rope_type": "default", "rope_theta": theta}
    return AutoConfig.for_model(family, **common, rope_parameters=rope)


def _mlx_extras(family: str) -> dict[str, Any]:
    """Top-level keys mlx_lm's ModelArgs need; transformers ignores/accepts them on reload."""
    extras: dict[str, Any] = {"rope_theta": _ROPE_THETA[family]}
    if family == "gemma3":
        extras["rope_local_base_freq"] = _GEMMA3_LOCAL_THETA
        extras["sliding_window_pattern"] = _GEMMA3_PATTERN
    return extras


# Per-matrix gains on top of 1/sqrt(fan_in), tuned so greedy decoding on the tiny models is varied
# (context-dependent) rather than echoing one token, and top-2 logit gaps sit far above float noise.
_GAINS = {"q_proj": 2.0, "k_proj": 2.0, "o_proj": 0.5, "down_proj": 3.0}
_EMBED_STD = 0.5


def _randomize(model: Any, family: str, seed: int) -> None:
    """Redraw every parameter from a seeded generator, with scales that give peaky, varied logits.

    transformers' default init (std 0.02, zero biases, unit norms) gives near-uniform logits whose
    top-2 gaps are within float noise, and tied models then just repeat one token; it also leaves
    biases and norm weights trivial, hiding loading/convention bugs (e.g. gemma's ``1 + w``).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim == 2 and "embed_tokens" in name:
                # gemma multiplies embeddings by sqrt(hidden); undo it so the residual starts alike
                std = _EMBED_STD / (hidden**0.5 if family == "gemma3" else 1.0)
                param.copy_(noise * std)
            elif param.ndim == 2:
                gain = next((g for key, g in _GAINS.items() if key in name), 1.0)
                param.copy_(noise * gain * param.shape[1] ** -0.5)
            elif name.endswith("bias"):
                param.copy_(noise * 0.1)
            else:  # norm weights: keep their centre (1 for llama/qwen, 0 for gemma's 1 + w)
                param.copy_(param + noise * 0.1)


def build_tiny_model(family: str, dest: Path, *, seed: int = 0) -> Path:
    """Write a tiny random float32 model of ``family`` (config, safetensors, tokenizer) into dest."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    import torch
    from transformers import AutoModelForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _make_tokenizer()
    ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END),
        "pad_token_id": tokenizer.convert_tokens_to_ids(BOS_TOKEN),
    }
    config = _config(family, len(tokenizer), ids)
    with torch.random.fork_rng(devices=[]):  # the default init draws from the global RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, family, seed)  # redraws every parameter, so the default init is irrelevant
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))

    config_path = dest / "config.json"
    data = json.loads(config_path.read_text())
    data.update(_mlx_extras(family))
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return dest


def tiny_model_dir(family: str, root: Path) -> Path:
    """Return ``root/tiny-<family>`` (seed 0), building it on first use (atomic rename, race-safe)."""
    dest = Path(root) / f"tiny-{family}"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    tmp = Path(root) / f".tiny-{family}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(family, tmp)
    try:
        tmp.rename(dest)
    except OSError:  # another process won the race; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --- the real entry point, for CLI tests ------------------------------------------------------------

def chat_env(tmp: Path) -> dict[str, str]:
    """The environment a CLI test runs `python -m lmm.chat` in: artifacts and history under `tmp`."""
    return {**os.environ, "LMM_ARTIFACTS": str(Path(tmp) / "artifacts"), "LMM_HISTORY_FILE": str(Path(tmp) / "h")}


def run_chat(args: list[str], stdin: bytes, tmp: Path, timeout: int = 240) -> Any:
    """Pipe `stdin` into `python -m lmm.chat ARGS` (cwd `tmp`); the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lmm.chat", *args], input=stdin, capture_output=True,
                          timeout=timeout, env=chat_env(tmp), cwd=tmp)


def tiny_chat_args(models: dict[str, Path], backend: str = "torch", family: str = "llama") -> list[str]:
    """Flags for a short chat on a tiny model folder (see the `tiny_models` fixture)."""
    return ["--model", str(models[family]), "--backend", backend, "--max-tokens", "6"]
