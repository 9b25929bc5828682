"""Chat prompts get exactly the tokens transformers gives a chat, on a tokenizer whose post-processor adds BOS
and whose template writes BOS too (Llama 3's way): LLM.chat, a rendered chat passed to generate or to score as
text, and training prompts. transformers' tokenizer(text) would give such text two BOS tokens."""
import json
import shutil

import pytest
import torch

from promptcot_engine import LLM, SamplingParams
from promptcot_engine.errors import InputError
from promptcot_engine.models.tokenizer import Tokenizer
from promptcot_engine.train.data import tokenize_preferences, tokenize_sft
from tests.reference import hf_model

BOS = "<|endoftext|>"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two plus two"}]


@pytest.fixture(scope="module")
def bos_model_dir(tiny_llama_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(tiny_llama_dir, directory)
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    bos_id = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == BOS)
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}}}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": BOS}))
    template = directory / "chat_template.jinja"
    template.write_text("{{ bos_token }}" + template.read_text())
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer(bos_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bos_model_dir)


def test_encode_prompt_keeps_one_bos(bos_model_dir, hf_tokenizer):
    tokenizer = Tokenizer.from_dir(bos_model_dir)
    text = tokenizer.apply_chat_template(MESSAGES)
    assert text == hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    chat_ids = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert chat_ids.count(hf_tokenizer.bos_token_id) == 1
    assert tokenizer.encode(text) == hf_tokenizer(text).input_ids == [hf_tokenizer.bos_token_id] + chat_ids
    assert tokenizer.encode_prompt(text) == chat_ids
    assert tokenizer.encode_prompt("two plus two") == hf_tokenizer("two plus two").input_ids  # plain text keeps its BOS


def test_chat_and_rendered_text_prompts_match_transformers_chat(bos_model_dir, hf_tokenizer):
    llm = LLM(bos_model_dir, dtype="float32", device="cpu")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    chat_ids = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    model = hf_model(bos_model_dir)
    with torch.no_grad():
        ids = torch.tensor([chat_ids])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                                  do_sample=False, pad_token_id=0)[0, len(chat_ids):].tolist()
    by_chat, by_text = llm.chat([MESSAGES, MESSAGES[1:]], params, use_tqdm=False)[0], llm.generate(
        [llm.tokenizer.apply_chat_template(MESSAGES)], params, use_tqdm=False)[0]
    for output in (by_chat, by_text):
        assert output.prompt_token_ids == chat_ids
        assert output.prompt == llm.tokenizer.apply_chat_template(MESSAGES)
    assert by_chat.outputs[0].token_ids == by_text.outputs[0].token_ids
    # min_new_tokens masks EOS on transformers' side; ignore_eos may still sample it: compare up to it
    eos = llm.engine.eos_token_ids
    got = by_chat.outputs[0].token_ids
    cut = next((i for i, t in enumerate(expected) if t in eos), len(expected))
    assert got[:cut] == expected[:cut]
    assert llm.chat(MESSAGES, params, use_tqdm=False)[0].prompt_token_ids == chat_ids  # one conversation
    score = llm.score([llm.tokenizer.apply_chat_template(MESSAGES)], [" four"], use_tqdm=False)[0]
    assert score.token_ids == hf_tokenizer(" four", add_special_tokens=False).input_ids
    with pytest.raises(InputError, match="conversation 1: expected a list"):
        llm.chat([MESSAGES, "not a conversation"], params, use_tqdm=False)


def test_training_prompts_get_one_bos(bos_model_dir, hf_tokenizer):
    tokenizer = Tokenizer.from_dir(bos_model_dir)
    prompt = tokenizer.apply_chat_template(MESSAGES)
    chat_ids = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    (sft,), _ = tokenize_sft([("a.jsonl:1", {"prompt": prompt, "completion": " four"})], tokenizer, 512, "truncate")
    assert sft.input_ids[:len(chat_ids)] == chat_ids and sft.input_ids.count(hf_tokenizer.bos_token_id) == 1
    (pair,), _ = tokenize_preferences([("p.jsonl:1", {"prompt": prompt, "chosen": " four", "rejected": " five"})],
                                      tokenizer, 512, "truncate")
    assert pair.prompt_ids == chat_ids


def test_a_failing_chat_template_names_the_conversation(bos_model_dir, tmp_path):
    directory = tmp_path / "strict"
    shutil.copytree(bos_model_dir, directory)
    template = directory / "chat_template.jinja"
    template.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                        + template.read_text())
    llm = LLM(directory, dtype="float32", device="cpu")
    with pytest.raises(InputError, match=r"conversation 1: the chat template failed on these messages \(no system role\)"):
        llm.chat([MESSAGES[1:], MESSAGES], use_tqdm=False)
    with pytest.raises(InputError, match=r"b.jsonl:3: the chat template failed"):
        tokenize_sft([("b.jsonl:3", {"messages": [*MESSAGES, {"role": "assistant", "content": "4"}]})], llm.tokenizer,
                     512, "truncate")
