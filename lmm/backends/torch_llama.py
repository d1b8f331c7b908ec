"""Llama-family decoders (llama, mistral, qwen2, qwen3) in plain torch, read from a model folder.

Owns the decoder itself (embeddings, RMSNorm, RoPE, grouped-query attention, gated MLP), its KV
cache (`KVCache`: the few operations the torch backend uses: length, crop, copy, batch repeat,
beam reorder), loading `model.safetensors` (single or sharded) and a beam search. The attention
reads `lmm.backends.attention_memory`'s per-thread plan itself: keys/values captured, extra
keys/values prepended for the layers a memory module reads.

Why it exists: importing transformers takes ~6 s of a ~9.5 s cold start on a 2-core CPU (it pulls
in torch._dynamo, torch.distributed and scipy); these models need none of it. Other families
(gemma3, sliding windows, RoPE types other than default / linear / llama3) still load through
transformers (`unsupported` says why).
It owns no generation loop, sampling or memory logic: those are the backend's and the modules'.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmm.backends.attention_memory import current_plan, torch_prepend

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    head_dim: int = 0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o biases (qwen2: q/k/v always, o never)
    mlp_bias: bool = False
    rope_scaling: dict[str, Any] | None = None  # rope_type linear / llama3 and their factors

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {', '.join(FAMILIES)}")
        if self.head_dim <= 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelArgs:
        """The args of a config.json, or ValueError naming what this implementation does not cover."""
        why = unsupported(config)
        if why:
            raise ValueError(why)
        rope = _rope(config)
        fields = {k: config[k] for k in cls.__dataclass_fields__ if k in config and config[k] is not None}
        fields["rope_theta"] = float(rope.get("rope_theta") or 10000.0)
        fields["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        return cls(**fields)


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings in transformers 5's form (`rope_parameters`) from either spelling of config.json."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_theta", config.get("rope_theta"))
    return rope


def unsupported(config: dict[str, Any]) -> str | None:
    """Why `config` needs transformers' implementation, or None when this file runs it exactly."""
    family = config.get("model_type")
    if family not in FAMILIES:
        return f"model_type {family!r}"
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        return f"RoPE type {rope.get('rope_type')!r}"
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary embeddings"
    sliding = config.get("use_sliding_window") if family != "mistral" else config.get("sliding_window")
    if sliding or "sliding_attention" in (config.get("layer_types") or ()):
        return "sliding-window attention"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')!r}"
    if int(config.get("pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # normalised in float32, as the reference implementations do
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _LayerKV:
    """One layer's cached keys and values, [batch, kv heads, positions, head dim]."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


class KVCache:
    """Keys/values per layer. Every update makes new tensors, so a shallow copy of `layers`' entries
    (the backend's cache views) is independent of the cache it came from."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [_LayerKV() for _ in range(num_layers)]

    def get_seq_length(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else int(keys.shape[-2])

    def update(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[index]
        if layer.keys is not None:
            keys, values = torch.cat([layer.keys, keys], dim=-2), torch.cat([layer.values, values], dim=-2)
        layer.keys, layer.values = keys, values
        return keys, values

    def crop(self, n: int) -> None:
        """Keep the first `n` positions (negative: drop the last -n), as DynamicCache.crop does."""
        if n < 0:
            n = self.get_seq_length() + n
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
                layer.values = layer.values.repeat_interleave(repeats, dim=0)

    def reorder(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[rows], layer.values[rows]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, index: int) -> None:
        super().__init__()
        self.index, self.head_dim = index, args.head_dim
        self.n_heads, self.n_kv = args.num_attention_heads, args.num_key_value_heads
        qkv_bias = args.attention_bias or args.model_type == "qwen2"
        o_bias = args.attention_bias and args.model_type != "qwen2"
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=o_bias)
        qk_norm = args.model_type == "qwen3"
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        plan = current_plan()
        if plan is not None and self.index in plan.capture_kv:
            plan.captured.kv[self.index] = (k.detach().clone(), v.detach().clone())
        if cache is not None:
            k, v = cache.update(self.index, k, v)
        extra = None if plan is None else plan.inject.get(self.index)
        if extra is not None:
            k, v, mask = torch_prepend(q, k, v, mask, extra, plan)
        grouped = self.n_kv != self.n_heads
        if grouped and mask is not None:  # SDPA's grouped-query path takes no mask: repeat the kv heads
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        causal = mask is None and t > 1  # no mask only when the queries are all the keys (or one query)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.head_dim**-0.5,
                                             enable_gqa=grouped and mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        bias = args.mlp_bias
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, index)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # given weights skip the random init, whose normal_ on the meta device imports torch._dynamo (1.3 s)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


@dataclass
class Output:
    logits: torch.Tensor


def _inv_freq(args: ModelArgs, device: torch.device | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies, scaled as `rope_scaling` says (the formulas transformers uses)."""
    steps = torch.arange(0, args.head_dim, 2, dtype=torch.float, device=device)
    inv_freq = 1.0 / (args.rope_theta ** (steps / args.head_dim))
    scaling = args.rope_scaling or {}
    kind, factor = scaling.get("rope_type", "default"), float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":  # long wavelengths divided by `factor`, short ones kept, a smooth ramp between
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        medium = ~(wavelen < context / high) * ~(wavelen > context / low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq


class CausalLM(nn.Module):
    """`model.layers` holds the decoder layers, whose forward takes the hidden states first and
    returns them (what the backend's hooks expect); the call mirrors transformers' keywords."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # computed on the CPU even under load_model's meta device: a meta arange imports torch._dynamo
        self.register_buffer("inv_freq", _inv_freq(args, torch.device("cpu")), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_cache(self) -> KVCache:
        return KVCache(self.args.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor | None = None, *, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, use_cache: bool = True,
                hidden: torch.Tensor | None = None, first_layer: int = 0) -> Output:
        """Logits of `input_ids`; or, given `hidden` [batch, t, d], the states entering layer
        `first_layer`, of the layers from there on (the layers below are not run)."""
        x = self.model.embed_tokens(input_ids) if hidden is None else hidden
        t = x.shape[1]
        past = 0 if cache is None else cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device)[None]
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [batch, 1 (heads), t, head dim]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = attention_mask
        if mask is None and t > 1 and past:  # bottom-right causal: query i sees keys up to past + i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)[None, None]
        for layer in self.model.layers[first_layer:]:
            x = layer(x, cos, sin, cache if use_cache else None, mask)
        if isinstance(logits_to_keep, int):
            x = x[:, -logits_to_keep:] if logits_to_keep else x
        else:
            x = x[:, logits_to_keep]
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight
        return Output(logits=F.linear(x, head))


def load_model(folder: Path, dtype: torch.dtype, device: torch.device,
               config: dict[str, Any] | None = None) -> CausalLM:
    """Build the model on the meta device and assign the folder's tensors (no random init, no copy).
    `config`: the folder's config.json when the caller has read it already."""
    from safetensors.torch import load_file

    args = ModelArgs.from_config(config or json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = CausalLM(args)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    model.inv_freq = model.inv_freq.to(device)  # a plain CPU tensor: the meta context leaves it alone
    return model.eval().requires_grad_(False)


def beam_search(model: CausalLM, prompt_ids: list[int], num_beams: int, max_tokens: int, stop_ids: set[int],
                device: torch.device) -> list[int]:
    """Beam search with length-normalised scores (sum of log-probabilities / length), finished
    hypotheses kept until `num_beams` are done and no live beam can still beat the worst of them."""
    cache = model.new_cache()
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache, logits_to_keep=1).logits[:, -1]
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    done: list[tuple[float, list[int]]] = []
    for step in range(1, max_tokens + 1):
        logprobs = torch.log_softmax(logits.float(), -1)
        totals = logprobs + torch.tensor([s for s, _ in beams], device=device)[:, None]
        scores, flat = totals.view(-1).topk(min(2 * num_beams, totals.numel()))
        keep: list[tuple[float, list[int]]] = []
        rows: list[int] = []
        for score, index in zip(scores.tolist(), flat.tolist(), strict=True):
            row, token = divmod(index, totals.shape[-1])
            if token in stop_ids:
                done.append((score / step, beams[row][1]))
            elif len(keep) < num_beams:
                keep.append((score, [*beams[row][1], token]))
                rows.append(row)
        done = sorted(done, key=lambda d: -d[0])[:num_beams]
        if not keep or step == max_tokens or (len(done) == num_beams and keep[0][0] / step <= done[-1][0]):
            done.extend((s / step, toks) for s, toks in keep if step == max_tokens)
            break
        cache.reorder(torch.tensor(rows, device=device))
        beams = keep
        last = torch.tensor([[toks[-1]] for _, toks in beams], device=device)
        logits = model(last, cache=cache).logits[:, -1]
    return max(done, key=lambda d: d[0])[1] if done else []
