"""Token ids and chat-template output equal transformers' on a varied corpus."""
import json
import shutil

import pytest

from promptcot_engine.models.gguf_checkpoint import GGUFCheckpoint
from promptcot_engine.models.loader import resolve_model_path
from promptcot_engine.models.tokenizer import Tokenizer
from tests.tiny_checkpoints import tiny_checkpoint

CORPUS = [
    "Hello, world!",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "Let $f(x) = \\frac{x^2 + 1}{x - 3}$. Find $\\sum_{k=1}^{100} f(k)$ and \\boxed{42}.",
    "   leading spaces and trailing   ",
    "tabs\t\tand\r\nwindows newlines\r\n",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 🙂🚀👨‍👩‍👧 and flags 🇫🇷",
    "numbers 1234567890 3.14159 1e-9 -42 +7 1,000,000",
    "a  1000000 b   22 c\n\n  333",
    "Ünïcödé àccents ﬁ ligature ß Straße",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "mixed\u200bzero\u200dwidth and RTL עברית عربى",
    "",
    " ",
    "\n\n\n",
    "it's they're we'll I'd you've",
]
CORPUS_WITHOUT_DIGITS = [t for t in CORPUS if not any(c.isdigit() for c in t)]


def transformers_tokenizer(path, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kwargs)


def assert_same_ids(ours: Tokenizer, ref, corpus):
    for text in corpus:
        for special in (True, False):
            ids = ref.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text


def test_tiny_tokenizers_match_transformers(tiny_model_dir):
    assert_same_ids(Tokenizer.from_dir(tiny_model_dir), transformers_tokenizer(tiny_model_dir), CORPUS)


@pytest.mark.slow
def test_converted_smollm2_tokenizer_matches_transformers(smollm2_dir):
    assert_same_ids(Tokenizer.from_dir(smollm2_dir), transformers_tokenizer(smollm2_dir), CORPUS)


@pytest.fixture(scope="module")
def smollm2_gguf():
    path = resolve_model_path("smollm2-135m-instruct")
    return GGUFCheckpoint(path).tokenizer, transformers_tokenizer(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers(smollm2_gguf):
    ours, ref = smollm2_gguf
    assert_same_ids(ours, ref, CORPUS_WITHOUT_DIGITS)


@pytest.mark.slow
def test_gguf_tokenizer_splits_digits_like_the_released_tokenizer(smollm2_gguf):
    """The GGUF says pre-tokenizer 'smollm': llama.cpp and SmolLM2's released tokenizer.json split every digit
    off before the byte-level regex. transformers' GGUF import has no entry for 'smollm' and skips that split,
    so the reference here is transformers' tokenizer given the released pre-tokenizer."""
    from tokenizers import pre_tokenizers

    ours, ref = smollm2_gguf
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    assert_same_ids(ours, ref, CORPUS)
    assert ours.encode("a  1000000") != ours.encode("a") + ours.encode(" ") + ours.encode(" 1000000")


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 🙂"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Solve x^2 = 4.\n\nShow work."}],
]

# A Qwen2.5-style ChatML template: default system prompt, tool definitions, tool calls and tool responses.
QWEN_STYLE_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
{%- if messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- for tool_call in message.tool_calls %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.function.name }}{{- '", "arguments": ' }}{{- tool_call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def assert_same_chat(ours: Tokenizer, ref, conversations, **kwargs):
    for messages in conversations:
        for add_generation_prompt in (True, False):
            text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
            ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                          return_dict=False, **kwargs)
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs) == text
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            **kwargs) == list(ids)


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(smollm2_gguf):
    ours, ref = smollm2_gguf
    assert_same_chat(ours, ref, CONVERSATIONS)


def test_qwen_chatml_template_matches_transformers(tmp_path):
    path = tmp_path / "qwen_style"
    shutil.copytree(tiny_checkpoint("qwen2"), path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN_STYLE_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tools = [{"type": "function", "function": {"name": "add", "description": "Add «two» numbers",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
    tool_chat = CONVERSATIONS[0] + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2}}}]},
        {"role": "tool", "content": "4"}]
    ours, ref = Tokenizer.from_dir(path), transformers_tokenizer(path)
    assert_same_chat(ours, ref, CONVERSATIONS + [tool_chat])
    assert_same_chat(ours, ref, [tool_chat], tools=tools)
