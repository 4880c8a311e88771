"""`tokenizer.apply_chat_template` gives exactly the ids of `build_chat_input` (conversations that fit)."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from baichuan.chat_format import build_chat_input
from baichuan.checkpoint import read_config
from baichuan.hf import BaichuanTokenizer, BaichuanTokenizerFast
from baichuan.tokenizer import Tokenizer
from tests.conftest import shared_path

CONVERSATIONS = {
    "system": [
        {"role": "system", "content": "You are a helpful assistant. 你是百川助手。"},
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am Baichuan, a language model."},
        {"role": "user", "content": " leading space, 2023 digits and emoji 🙂\nnew line"},
    ],
    "no_system": [
        {"role": "user", "content": "世界上第二高的山峰是哪座？"},
        {"role": "assistant", "content": "K2, also called Chogori."},
        {"role": "user", "content": "Tell me more about it."},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ],
}


class Model:
    def __init__(self, directory):
        self.config = read_config(directory)
        self.generation_config = json.loads((directory / "generation_config.json").read_text())


def expected(directory, messages):
    # max_new_tokens=1: everything fits, so the builder keeps the whole conversation.
    return build_chat_input(
        Model(directory), Tokenizer(directory / "tokenizer.model"), messages, max_new_tokens=1
    )


@pytest.mark.parametrize("tokenizer_class", [BaichuanTokenizer, BaichuanTokenizerFast, AutoTokenizer])
@pytest.mark.parametrize("variant", ["baichuan1_13b", "baichuan2_7b", "baichuan2_13b"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chat_template_matches_builder(variant, conversation, tokenizer_class):
    directory = shared_path("oracle", "fixtures", variant, "checkpoint")
    messages = CONVERSATIONS[conversation]
    if variant == "baichuan1_13b" and messages[0]["role"] == "system":
        messages = messages[1:]  # Baichuan-13B-Chat has no system role
    tokenizer = tokenizer_class.from_pretrained(directory)
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert list(ids) == expected(directory, messages)


def test_chat_template_on_the_real_64k_vocabulary_with_dummy_prefix(tmp_path):
    # The real Baichuan-13B vocabulary adds a dummy prefix "▁" to every separately encoded message: the
    # template's text must still give those ids (each stretch between role tokens is encoded on its own).
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        shutil.copy(shared_path("oracle", "fixtures", "baichuan1_13b", "checkpoint", name), tmp_path / name)
    shutil.copy(shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model"), tmp_path / "tokenizer.model")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 64000}))
    for tokenizer_class in (BaichuanTokenizer, BaichuanTokenizerFast):
        tokenizer = tokenizer_class.from_pretrained(tmp_path)
        assert tokenizer.convert_ids_to_tokens([195, 196]) == ["<reserved_102>", "<reserved_103>"]
        for messages in (CONVERSATIONS["no_system"], CONVERSATIONS["ends_with_assistant"]):
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            assert list(ids) == expected(tmp_path, messages), tokenizer_class


def test_template_rejects_system_for_baichuan_13b_and_survives_save(tmp_path):
    directory = shared_path("oracle", "fixtures", "baichuan1_13b", "checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with pytest.raises(Exception, match="no system role"):
        tokenizer.apply_chat_template(CONVERSATIONS["system"], add_generation_prompt=True)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == tokenizer.chat_template
