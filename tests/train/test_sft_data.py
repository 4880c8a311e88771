"""Fine-tuning data: the original fine-tune.py's masks on the shared conversations, the three formats, bad
records reported by file and index, and batches (packed rows keep each example's attention to itself)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import baichuan
from baichuan.model import Baichuan
from baichuan.tokenizer import Tokenizer
from baichuan.train.sft_data import SFTBatches, SFTDataError, read_sft, tokenize_all, tokenize_conversation
from tests.conftest import ALIBI, ROPE, shared_path, tiny_config

SFT_FILE = ("data", "baichuan2_sft", "belle_chat_ramdon_10k.first1000.json")
USER, ASSISTANT, EOS, PAD = 195, 196, 2, 0


def expected_labels(ids: list[int], n_real: int) -> list[int]:
    """The original's rules read off the input alone: a user token is labelled EOS (the reply before it ends),
    a reply's tokens (after an assistant token, up to the next user token) and the final EOS are labelled with
    themselves, the assistant token, the user's text and the padding get -100."""
    labels, role = [], None
    for i, token in enumerate(ids):
        if i >= n_real:
            labels.append(-100)
        elif token == USER:
            role = "user"
            labels.append(EOS)
        elif token == ASSISTANT:
            role = "assistant"
            labels.append(-100)
        elif role == "assistant" or (token == EOS and i == n_real - 1):
            labels.append(token)
        else:
            labels.append(-100)
    return labels


def test_masks_follow_the_original_rules_on_the_first_100_shared_conversations():
    records = json.loads(shared_path(*SFT_FILE).read_text(encoding="utf-8"))[:100]
    tokenizer = Tokenizer(shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model"))
    length = 512
    truncated = 0
    for record in records:
        item = baichuan.tokenize_conversation(tokenizer, record, length)
        # The input: role token and text per turn, EOS at the end, cut to 512, padded with <unk>.
        full = []
        for turn in record["conversations"]:
            full += [USER if turn["from"] == "human" else ASSISTANT] + tokenizer.sp.encode(turn["value"])
        full.append(EOS)
        truncated += len(full) > length
        n_real = min(len(full), length)
        full_labels = expected_labels(full, len(full))[:length]
        ids = full[:length] + [PAD] * (length - n_real)
        labels = full_labels + [-100] * (length - n_real)
        assert item["input_ids"].tolist() == ids, record["id"]
        assert item["labels"].tolist() == labels, record["id"]
        assert item["attention_mask"].tolist() == [t != PAD for t in ids]
        assert item["input_ids"].dtype == torch.long and item["attention_mask"].dtype == torch.bool
    assert 0 < truncated < 100  # both cases are exercised


def test_three_formats_give_the_same_tokens(tmp_path, tokenizer_dir):
    tokenizer = Tokenizer(tokenizer_dir / "tokenizer.model")
    (tmp_path / "c.json").write_text(
        json.dumps(
            [
                {
                    "id": "1",
                    "conversations": [
                        {"from": "human", "value": "hello there\ninput"},
                        {"from": "gpt", "value": "the answer"},
                    ],
                }
            ]
        )
    )
    (tmp_path / "a.json").write_text(
        json.dumps([{"instruction": "hello there", "input": "input", "output": "the answer"}])
    )
    (tmp_path / "m.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hello there\ninput"},
                    {"role": "assistant", "content": "the answer"},
                ]
            }
        )
        + "\n"
    )
    results = []
    for name, format in (("c.json", "conversations"), ("a.json", "alpaca"), ("m.jsonl", "messages")):
        data = read_sft(tmp_path / name)
        assert data.format == format and not data.bad
        examples, _ = tokenize_all(tokenizer, data.conversations, 64)
        results.append((examples[0].input_ids.tolist(), examples[0].labels.tolist()))
    assert results[0] == results[1] == results[2]
    # A system message goes first, without a role token or loss; the user token after it is not labelled.
    (tmp_path / "s.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok"},
                ]
            }
        )
    )
    example = tokenize_all(tokenizer, read_sft(tmp_path / "s.jsonl").conversations, 64)[0][0]
    system = tokenizer.encode("be brief")
    assert example.input_ids[: len(system) + 1].tolist() == system + [USER]
    assert (example.labels[: len(system) + 1 + len(tokenizer.encode("hi")) + 1] == -100).all()


def test_bad_records_are_reported_with_file_and_index(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),  # no reply
        json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"messages": "q"}),
        "",
        json.dumps(good),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = read_sft(path)
    assert len(data.conversations) == 2
    assert [(b.index, b.line) for b in data.bad] == [(2, True), (3, True), (4, True), (5, True), (6, True)]
    reasons = [str(b) for b in data.bad]
    assert reasons[0].startswith(f"{path}: line 2: invalid JSON")
    assert (
        "no reply" in reasons[1]
        and "empty" in reasons[2]
        and "'bot'" in reasons[3]
        and "not a list" in reasons[4]
    )
    with pytest.raises(SFTDataError, match=r"(?s)5 bad record\(s\).*line 2: invalid JSON"):
        read_sft(path, strict=True)
    # A JSON array: 0-based record indices.
    array = tmp_path / "c.json"
    array.write_text(
        json.dumps(
            [
                {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                {
                    "conversations": [
                        {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"},
                        {"from": "human", "value": "b"},
                    ]
                },
                {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
                {"id": "x"},
            ]
        )
    )
    data = read_sft(array)
    assert len(data.conversations) == 1
    assert [str(b).split(": ", 2)[1] for b in data.bad] == ["record 1", "record 2", "record 3"]
    assert "no reply" in data.bad[0].reason and "'value' is missing" in data.bad[1].reason


def _examples(n: int, seed: int = 0):
    from baichuan.train.sft_data import Example

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(5, 20))
        ids = rng.integers(3, 500, length)
        labels = np.where(rng.random(length) < 0.5, ids, -100)
        out.append(Example(ids.astype(np.int64), labels.astype(np.int64)))
    return out


@pytest.mark.parametrize("position", [ROPE, ALIBI])
def test_packed_rows_equal_each_example_alone(position):
    torch.manual_seed(0)
    model = Baichuan(tiny_config(position)).eval()
    model.init_weights(generator=torch.Generator().manual_seed(0))
    examples = _examples(6)
    batches = SFTBatches(examples, 64, 2, pack=True)
    assert batches.n_rows < len(examples)
    batch = batches.micro_batches(0)[0]
    with torch.no_grad():
        packed = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        for b, row in enumerate(batches.row(i) for i in range(2)):
            at = 0
            for i in row:
                ids = torch.from_numpy(examples[i].input_ids)[None]
                alone = model(ids)[0]
                n = ids.shape[1]
                torch.testing.assert_close(packed[b, at : at + n], alone, rtol=1e-4, atol=1e-4)
                # the first label of each example is dropped (it would be predicted across examples)
                assert batch["labels"][b, at] == -100
                assert batch["labels"][b, at + 1 : at + n].tolist() == examples[i].labels[1:].tolist()
                at += n


def test_ranks_split_the_global_batch():
    examples = _examples(20)
    one = SFTBatches(examples, 32, 4, grad_accum=1, world_size=1, seed=3)
    halves = [SFTBatches(examples, 32, 2, world_size=2, rank=r, seed=3) for r in range(2)]
    for step in (0, 4, 7):  # 7: past the first epoch
        rows = [one.row(step * 4 + j) for j in range(4)]
        assert [halves[r].row(step * 4 + r * 2 + j) for r in range(2) for j in range(2)] == rows
    assert one.state_dict()["global_batch"] == halves[0].state_dict()["global_batch"] == 4
    # Rows are cut to the longest in the micro-batch; an unk (pad id) inside the text brings the original's mask.
    batch = one.micro_batches(0)[0]
    assert batch["input_ids"].shape[1] == max(
        len(examples[i[0]].input_ids) for i in [one.row(j) for j in range(4)]
    )
    assert "attention_mask" not in batch
    examples[0].input_ids[2] = 0
    masked = SFTBatches(examples, 32, 1).collate([[0]])
    assert (
        masked["attention_mask"][0, 2].item() is False
        and masked["attention_mask"][0].sum() == len(examples[0].input_ids) - 1
    )


def test_tokenize_conversation_accepts_a_transformers_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=False)
    ours = Tokenizer(tokenizer_dir / "tokenizer.model")
    record = {"conversations": [{"from": "human", "value": "what is 2 + 2"}, {"from": "gpt", "value": "4"}]}
    a = tokenize_conversation(hf, record, 32)
    b = tokenize_conversation(ours, record, 32)
    assert all(torch.equal(a[k], b[k]) for k in a)
