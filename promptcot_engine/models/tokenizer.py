"""Tokenizer: the `tokenizers` library for text <-> ids, jinja2 for the checkpoint's chat template.

Built from an HF directory (tokenizer.json + tokenizer_config.json) or from a GGUF file's metadata
(llama.cpp's byte-level BPE layout). Chat templates render in the same sandboxed jinja2 setup
transformers uses, so strings and ids match transformers' apply_chat_template.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

from promptcot_engine.errors import InputError

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the regex its vocabulary's merges were learned with
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# These vocabularies split every digit off before the GPT-2 regex (SmolLM's released tokenizer.json does
# the same with a Digits pre-tokenizer).
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "codeshell"}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
        model_max_length: int | None = None,
    ):
        self.backend = tokenizer
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.model_max_length = model_max_length

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise InputError(f"{tokenizer_file}: no such file (the checkpoint has no tokenizer)")
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises bare Exceptions for malformed files
            raise InputError(f"{tokenizer_file}: not a valid tokenizer file ({e})") from None
        config_file = directory / "tokenizer_config.json"
        config = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise InputError(f"{config_file}: invalid JSON ({e.msg} at line {e.lineno})") from None
        chat_template = config.get("chat_template")
        template_file = directory / "chat_template.jinja"
        if chat_template is None and template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        if isinstance(chat_template, list):  # named templates: transformers picks "default"
            chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
        special = {name: _token_content(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        max_length = config.get("model_max_length")
        return cls(backend, chat_template, special, int(max_length) if isinstance(max_length, (int, float)) and max_length < 1e12 else None)

    @classmethod
    def from_gguf_fields(cls, fields: dict, source: str) -> "Tokenizer":
        """Build from GGUF metadata (tokenizer.ggml.*): a byte-level BPE vocabulary, as llama.cpp stores it."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise InputError(f"{source}: unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2' (byte-level BPE)")
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        backend = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
        pre = fields.get("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        if pre in _DIGIT_SPLIT_PRES:
            split = [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Split(Regex(_GPT2_SPLIT), "isolated")]
        else:
            split = [pre_tokenizers.Split(Regex(_SPLIT_BY_PRE.get(pre, _GPT2_SPLIT)), "isolated")]
        backend.pre_tokenizer = pre_tokenizers.Sequence([*split, byte_level])
        backend.decoder = decoders.ByteLevel()
        token_types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == _GGUF_CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _GGUF_USER_DEFINED]
        )

        def token(key: str) -> str | None:
            i = fields.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                   "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
        if fields.get("tokenizer.ggml.add_bos_token") and special["bos_token"]:
            bos = special["bos_token"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
            )
        return cls(backend, fields.get("tokenizer.chat_template"), special)

    # ---- ids ----------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids: `encode` with special tokens, except that text already starting with the BOS token
        (a rendered chat template that writes its own, as Llama 3's does) does not get a second one from the
        tokenizer's post-processor. transformers' tokenizer(text) would give two, unlike its own chat
        tokenization; TRL adds BOS only where missing, as here."""
        ids = self.encode(text)
        bos, bos_id = self.special_tokens.get("bos_token"), self.bos_token_id
        if bos_id is not None and ids[:2] == [bos_id, bos_id] and text.startswith(bos):
            return ids[1:]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens.get("eos_token")
        return None if eos is None else self.backend.token_to_id(eos)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.special_tokens.get("bos_token")
        return None if bos is None else self.backend.token_to_id(bos)

    # ---- chat ---------------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False, **kwargs
    ) -> str | list[int]:
        """Render `messages` with the checkpoint's template; tokenize=True returns ids (no special tokens
        added on top: the template writes its own), as transformers does."""
        if not self.chat_template:
            raise InputError("this checkpoint has no chat template (tokenizer_config.json or GGUF metadata)")
        text = _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def render_chat(self, messages: list[dict], where: str, add_generation_prompt: bool = True) -> str:
        """apply_chat_template's text, with a template's own failure (raise_exception, a missing field) an
        InputError naming `where` (a file:line, a conversation's index)."""
        try:
            return self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise InputError(f"{where}: the chat template failed on these messages ({e})") from None

    def chat_prompt(self, messages: list[dict], where: str,
                    add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        """The conversation as `render_chat` renders it, and its ids tokenized as transformers tokenizes a chat:
        no special tokens added, the template writes its own."""
        text = self.render_chat(messages, where, add_generation_prompt)
        return text, self.encode(text, add_special_tokens=False)

    # ---- saving -------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json, loadable by transformers' AutoTokenizer and by from_dir."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **self.special_tokens}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_content(value) -> str | None:
    if isinstance(value, dict):  # older tokenizer_config.json files store AddedToken dicts
        return value.get("content")
    return value


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat templates must not do
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
