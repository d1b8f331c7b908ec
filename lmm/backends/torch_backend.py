"""PyTorch backend (CUDA, MPS, CPU).

Owns loading a Hugging Face causal LM folder (llama, mistral, qwen2 and qwen3 through this package's own
`torch_llama`, without importing transformers; any other family through transformers), the
forward hook on the chosen decoder layer, cache handling (views and truncation for prefix reuse),
beam search, and `TorchOps`, the array operations memory modules run on. Imports torch lazily
through this module only: an mlx user never imports it.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmm.backends import torch_llama
from lmm.backends.attention_memory import AttentionPlan, StopForward, enable_torch_attention, plan_scope
from lmm.backends.base import (
    Backend,
    BackendError,
    DecodingConfig,
    FrozenPrefix,
    check_logprob_batch,
    find_layers,
    join_logprobs,
)
from lmm.chat_format import ChatFormatter
from lmm.chat_tokenizer import load_tokenizer
from lmm.ops import Params
from lmm.types import Captured, HookFn

RUNTIMES = ("auto", "transformers")  # auto: this package's llama-family file where it covers the model
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda: CUDA is not available on this machine")
    if device == "mps" and not torch.backends.mps.is_available():
        raise BackendError("--device mps: MPS is not available on this machine")
    if device not in {"cpu", "cuda", "mps"}:
        raise BackendError(f"unknown device {device!r}; choose auto, cpu, cuda or mps")
    return torch.device(device)


@dataclass
class TorchOps:
    device: torch.device
    name: str = "torch"

    def asarray(self, x: Any, dtype: str = "float32") -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), device=self.device).to(getattr(torch, dtype))

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.cpu().numpy()

    def zeros(self, shape: Sequence[int], dtype: str = "float32") -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=getattr(torch, dtype), device=self.device)

    def astype(self, x: torch.Tensor, dtype: Any) -> torch.Tensor:
        return x.to(dtype.dtype if isinstance(dtype, torch.Tensor) else getattr(torch, dtype))

    def dtype_name(self, x: torch.Tensor) -> str:
        return str(x.dtype).removeprefix("torch.")

    sigmoid = staticmethod(torch.sigmoid)
    tanh = staticmethod(torch.tanh)
    exp = staticmethod(torch.exp)
    sqrt = staticmethod(torch.sqrt)
    abs = staticmethod(torch.abs)
    argsort = staticmethod(lambda x, axis=-1: torch.argsort(x, dim=axis))
    cumsum = staticmethod(lambda x, axis=-1: torch.cumsum(x, dim=axis))
    swapaxes = staticmethod(torch.swapaxes)
    expand_dims = staticmethod(torch.unsqueeze)

    def maximum(self, x: torch.Tensor, y: Any) -> torch.Tensor:
        return torch.clamp(x, min=y) if isinstance(y, (int, float)) else torch.maximum(x, y)

    def where(self, cond: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
        return torch.where(cond, x, y)

    def softmax(self, x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        return torch.softmax(x, dim=axis)

    def log_softmax(self, x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        return torch.log_softmax(x, dim=axis)

    def sum(self, x: torch.Tensor, axis: int | None = None, keepdims: bool = False) -> torch.Tensor:
        return x.sum() if axis is None else x.sum(dim=axis, keepdim=keepdims)

    def mean(self, x: torch.Tensor, axis: int | None = None, keepdims: bool = False) -> torch.Tensor:
        return x.mean() if axis is None else x.mean(dim=axis, keepdim=keepdims)

    def norm(self, x: torch.Tensor, axis: int = -1, keepdims: bool = False) -> torch.Tensor:
        return torch.linalg.vector_norm(x, dim=axis, keepdim=keepdims)

    def concat(self, xs: Sequence[torch.Tensor], axis: int = 0) -> torch.Tensor:
        return torch.cat(list(xs), dim=axis)

    def stack(self, xs: Sequence[torch.Tensor], axis: int = 0) -> torch.Tensor:
        return torch.stack(list(xs), dim=axis)

    def take(self, x: torch.Tensor, indices: torch.Tensor, axis: int = 0) -> torch.Tensor:
        return torch.index_select(x, axis, indices.to(torch.long).reshape(-1)).reshape(
            *x.shape[:axis], *indices.shape, *x.shape[axis + 1:]
        )

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets.to(torch.long), reduction="none")

    def value_and_grad(self, fn: Callable[[Params], torch.Tensor], params: Params) -> tuple[Any, Params]:
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            loss = fn(leaves)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        pairs = zip(leaves.items(), grads, strict=True)
        out = {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in pairs}
        return loss.detach(), out

    def stop_gradient(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    def evaluate(self, *xs: Any) -> None:
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, OSError) as exc:
        raise BackendError(f"cannot read {path}: {exc}") from None


def _transformers_model(model_path: Path, dtype: torch.dtype, local_files_only: bool) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-start "Loading weights" bar is noise in a chat
    return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, local_files_only=local_files_only)


class TorchBackend(Backend):
    name = "torch"
    supports_beam = True

    def __init__(self, model_path: Path, model_id: str, *, device: str = "auto", dtype: str = "auto",
                 local_files_only: bool = True, runtime: str = "auto") -> None:
        super().__init__()
        if runtime not in RUNTIMES:
            raise BackendError(f"unknown torch runtime {runtime!r}; choose {', '.join(RUNTIMES)}")
        self.device = pick_device(device)
        if dtype == "auto":
            torch_dtype = torch.float32 if self.device.type == "cpu" else torch.float16
        elif dtype in _DTYPES:
            torch_dtype = _DTYPES[dtype]
        else:
            raise BackendError(f"unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
        model_path = Path(model_path)
        config = _read_json(model_path / "config.json")
        text = config.get("text_config", config)
        self.native = runtime != "transformers" and torch_llama.unsupported(config) is None
        if self.native:  # the llama family in this package's own file: transformers is never imported
            self.model = torch_llama.load_model(model_path, torch_dtype, self.device, config)
        else:
            self.model = _transformers_model(model_path, torch_dtype, local_files_only).to(self.device)
            self.model.eval().requires_grad_(False)
        self.runtime = "lmm" if self.native else "transformers"
        self.model_id, self.model_path = model_id, model_path
        self.precision = f"{self.device.type}:{torch_dtype}"
        self.hidden_size = int(text["hidden_size"])
        self.layer_path, self.layers = find_layers(self.model, int(text["num_hidden_layers"]))
        self.num_layers = len(self.layers)
        self.context_length = int(text.get("max_position_embeddings") or 2048)
        eos = _read_json(model_path / "generation_config.json").get("eos_token_id")  # absent: tokenizer's
        eos = eos if isinstance(eos, list) else [eos]
        self.formatter = ChatFormatter(load_tokenizer(model_path, local_files_only=local_files_only), eos)
        self.ops = TorchOps(self.device)
        self._hook_handle: Any = None
        # transformers 5.x renamed `past_key_values` to `cache`; accept both spellings.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # --- hook ------------------------------------------------------------------------
    def install_hook(self, layer: int, hook: HookFn) -> None:
        self.remove_hook()

        def on_output(_module: Any, _args: Any, output: Any) -> Any:
            if self._bypass_hook:
                return output
            if isinstance(output, tuple):
                return (hook(output[0], self.hook_context), *output[1:])
            return hook(output, self.hook_context)

        self._hook_handle = self.layers[layer].register_forward_hook(on_output)
        self.installed_hook, self._hook_layer = hook, layer

    def remove_hook(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self._memory_detached()

    # --- cache -------------------------------------------------------------------------
    def new_cache(self) -> Any:
        if self.native:
            return self.model.new_cache()
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def cache_length(self, cache: Any) -> int:
        return int(cache.get_seq_length())

    def cache_view(self, cache: Any, n: int) -> Any | None:
        view = copy.copy(cache)
        view.layers = [copy.copy(layer) for layer in cache.layers]
        return view if self._crop(view, n) else None

    def truncate_cache(self, cache: Any, n: int) -> bool:
        return self._crop(cache, n)

    def _crop(self, cache: Any, n: int) -> bool:
        remove = self.cache_length(cache) - n
        if remove <= 0:
            return remove == 0  # crop(-0) would crop to length 0
        try:
            cache.crop(-remove)
        except (RuntimeError, ValueError):
            return False
        return self.cache_length(cache) == n

    # --- forward -------------------------------------------------------------------------
    def _enable_plans(self) -> None:
        if not self.native:  # the native attention reads the plan itself
            enable_torch_attention(self.model)

    def _plan(self, offset: int | None) -> AttentionPlan | None:
        extra = self.extra_kv
        if extra is None:
            return None
        self._enable_plans()
        return AttentionPlan(inject=extra.layers, visible_from=extra.visible_from, offset=offset)

    def _forward(self, ids: Sequence[int], cache: Any, grad: bool, keep: Sequence[int] | None) -> torch.Tensor:
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        to_keep: Any = 0 if keep is None else torch.tensor(list(keep), dtype=torch.long, device=self.device)
        with nullcontext() if grad else torch.no_grad(), plan_scope(self._plan(self.cache_length(cache))):
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=to_keep,
                             **{self._cache_kw: cache})
        return out.logits[0].float()

    def _forward_above(self, hidden: torch.Tensor, hook: HookFn, grad: bool,
                       keep: Sequence[int] | None) -> torch.Tensor | None:
        if not self.native:
            return None
        to_keep: Any = 0 if keep is None else torch.tensor(list(keep), dtype=torch.long, device=self.device)
        with nullcontext() if grad else torch.no_grad():
            out = self.model(hidden=hook(hidden), first_layer=self._hook_layer + 1, cache=None, use_cache=False,
                             logits_to_keep=to_keep)
        return out.logits[0].float()

    def _repeat_rows(self, cache: Any, n: int) -> None:
        cache.batch_repeat_interleave(n)

    def _step_rows(self, tokens: Sequence[int], cache: Any) -> np.ndarray:
        input_ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
        with torch.no_grad(), plan_scope(None):
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1].float().cpu().numpy()

    def _compute_prefix(self, ids: list[int]) -> FrozenPrefix | bool:
        hidden: dict[int, torch.Tensor] = {}

        def before_layer(index: int) -> Any:
            def hook(_module: Any, args: Any, kwargs: Any) -> None:
                hidden[index] = (args[0] if args else kwargs["hidden_states"])[0].detach().clone()
            return hook

        handles = [layer.register_forward_pre_hook(before_layer(i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]
        cache = self.new_cache()
        self._bypass_hook = True
        try:
            with torch.no_grad(), plan_scope(None):
                logits = self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                                    use_cache=True, **{self._cache_kw: cache}).logits[0].float()
        finally:
            self._bypass_hook = False
            for handle in handles:
                handle.remove()
        if any(layer.keys.shape[-2] != len(ids) for layer in cache.layers):  # a sliding window dropped some
            return False
        return FrozenPrefix(list(ids), cache, hidden, torch.log_softmax(logits, -1).cpu().numpy())

    def capture(self, ids: Sequence[int], *, hidden_layers: Sequence[int] = (),
                kv_layers: Sequence[int] = (), shift: int = 0) -> Captured:
        if not ids:
            raise BackendError("capture needs at least one token")
        if kv_layers:
            self._enable_plans()
        plan = AttentionPlan(capture_kv=frozenset(kv_layers), hidden_layers=frozenset(hidden_layers))
        deepest = max(hidden_layers, default=None)

        def before_layer(index: int) -> Any:
            def hook(_module: Any, args: Any, kwargs: Any) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                plan.captured.hidden[index] = hidden[0].detach().clone()
                if not kv_layers and index == deepest:
                    raise StopForward
            return hook

        cache, prefix = self._start(ids, shift)  # first: computing the prefix runs a forward of its own
        handles = [self.layers[i].register_forward_pre_hook(before_layer(i), with_kwargs=True)
                   for i in plan.hidden_layers]
        skip = 0 if prefix is None else len(prefix.ids)
        input_ids = torch.tensor([list(ids[skip:])], dtype=torch.long, device=self.device)
        self._bypass_hook = True
        try:
            with torch.no_grad(), plan_scope(plan):
                positions = torch.arange(shift + skip, shift + len(ids), device=self.device)[None]
                self.model(input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                           **{self._cache_kw: cache})
        except StopForward:
            pass
        finally:
            self._bypass_hook = False
            for handle in handles:
                handle.remove()
        captured = plan.captured
        if prefix is not None:  # the caller sees every position, the system prompt's included
            captured.hidden = {i: torch.cat([prefix.hidden[i], h]) for i, h in captured.hidden.items()}
            kept = prefix.cache.layers
            captured.kv = {i: (torch.cat([kept[i].keys, k], dim=2), torch.cat([kept[i].values, v], dim=2))
                           for i, (k, v) in captured.kv.items()}
        return captured

    def token_logprobs(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        rows, shared = check_logprob_batch(batch)
        tails = torch.zeros((len(rows), max(len(r) for r in rows) - shared), dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):  # right padding needs no mask: under causal attention no token sees a pad
            tails[i, : len(row) - shared] = torch.tensor(row[shared:], dtype=torch.long)
        cache, prefix = self._start(rows[0][:shared])  # a prefix is shorter than what the rows share
        heads = [] if prefix is None else [prefix.logprobs]
        done = 0 if prefix is None else len(prefix.ids)
        self._bypass_hook = True
        try:
            with torch.no_grad(), plan_scope(None):
                if shared:  # the rows' common prefix runs once; its keys/values are shared by every row
                    prompt = torch.tensor([rows[0][done:shared]], dtype=torch.long, device=self.device)
                    logits = self.model(input_ids=prompt, use_cache=True, **{self._cache_kw: cache}).logits[0]
                    heads.append(torch.log_softmax(logits.float(), -1).cpu().numpy())
                    cache.batch_repeat_interleave(len(rows))
                logits = self.model(input_ids=tails, use_cache=True, **{self._cache_kw: cache}).logits.float()
        finally:
            self._bypass_hook = False
        return join_logprobs(rows, shared, np.concatenate(heads) if heads else None,
                             torch.log_softmax(logits, -1).gather(2, tails[:, 1:, None])[..., 0].cpu().numpy())

    def beam_search(self, prompt_ids: list[int], decoding: DecodingConfig, stop_ids: set[int]) -> list[int]:
        if self.native:
            with torch.no_grad(), plan_scope(self._plan(None)):
                return torch_llama.beam_search(self.model, prompt_ids, decoding.num_beams, decoding.max_tokens,
                                               stop_ids, self.device)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        with torch.no_grad(), plan_scope(self._plan(None)):  # offsets follow the growing cache
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=decoding.max_tokens, num_beams=decoding.num_beams, do_sample=False,
                eos_token_id=sorted(stop_ids), pad_token_id=self.formatter.tokenizer.pad_token_id
                or sorted(stop_ids)[0],
            )
        tokens = out[0, len(prompt_ids):].tolist()
        for i, tok in enumerate(tokens):
            if tok in stop_ids:
                return tokens[:i]
        return tokens
