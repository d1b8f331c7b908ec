"""A model folder's tokenizer and chat template, without importing transformers.

Owns reading `tokenizer.json` (the `tokenizers` library), the special tokens named in
`tokenizer_config.json`, and rendering the chat template with jinja2 in the sandboxed
environment transformers uses (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a non-escaping `tojson`). It offers the part of a Hugging Face tokenizer that
`lmm.chat_format.ChatFormatter` calls, and gives the same ids, offsets, text and renderings.

Why: `from transformers import AutoTokenizer` costs ~2.5 s of a cold start. `load_tokenizer`
falls back to transformers for folders this cannot read exactly (no tokenizer.json, a tokenizer
class whose pipeline transformers rebuilds). It does not own chat logic (see `lmm.chat_format`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

# Classes whose tokenizer.json transformers uses as it is (no pipeline rebuilt around its vocabulary).
_AS_SAVED = {"TokenizersBackend", "PreTrainedTokenizerFast"}
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class ChatTokenizer:
    """`tokenizers.Tokenizer` plus the folder's special tokens and chat template."""

    def __init__(self, tokenizer: Any, config: dict[str, Any], chat_template: str | None) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special_tokens_map = {k: t for k in _NAMED if (t := _token_text(config.get(k))) is not None}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        names = [*self.special_tokens_map.values(), *(t for t in map(_token_text, extra) if t)]
        self.all_special_ids = list(dict.fromkeys(i for t in names if (i := tokenizer.token_to_id(t)) is not None))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._template: Any = None

    @classmethod
    def from_folder(cls, folder: Path, config: dict[str, Any] | None = None) -> ChatTokenizer:
        """`config`: the folder's tokenizer_config.json when the caller has read it already."""
        from tokenizers import Tokenizer

        config = config or _read_config(folder)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), config, template)

    def _token_id(self, name: str) -> int | None:
        text = self.special_tokens_map.get(name)
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False,
                 verbose: bool = True) -> dict[str, list[Any]]:
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        out: dict[str, list[Any]] = {"input_ids": list(enc.ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = list(enc.offsets)
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self._tok.model).__name__ != "BPE":
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                                  (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)  # transformers' clean_up_tokenization, for WordPiece-style text
        return text

    def apply_chat_template(self, messages: Sequence[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        if tokenize:
            raise ValueError("ChatTokenizer renders text only; encode the rendering with __call__")
        if self._template is None:
            self._template = _compile(self.chat_template or "")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens_map)


def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))


def native_reason(folder: Path, config: dict[str, Any] | None = None) -> str | None:
    """Why `folder`'s tokenizer needs transformers, or None when `ChatTokenizer` reads it exactly."""
    if not (folder / "tokenizer.json").is_file() or not (folder / "tokenizer_config.json").is_file():
        return "no tokenizer.json / tokenizer_config.json"
    config = config or _read_config(folder)
    if config.get("tokenizer_class") not in _AS_SAVED:
        return f"tokenizer class {config.get('tokenizer_class')!r}"
    return None


def load_tokenizer(folder: Path, *, local_files_only: bool = True) -> Any:
    """The folder's tokenizer: a `ChatTokenizer` when it reads the folder exactly, else transformers'."""
    folder = Path(folder)
    config = _read_config(folder) if (folder / "tokenizer_config.json").is_file() else None
    if folder.is_dir() and native_reason(folder, config) is None:
        return ChatTokenizer.from_folder(folder, config)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=local_files_only)
