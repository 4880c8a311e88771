"""prepare-data and the packed batches: EOS between documents, bad lines reported by file and line, a
deterministic order that does not depend on the number of ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from baichuan.tokenizer import load_sentencepiece
from baichuan.train.data import PackedBatches, TokenFile, prepare_data
from tests.conftest import shared_path


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_bytes(
        b"first document\n\nsecond \xe4\xb8\xad\xe6\x96\x87\n\xff\xfe broken\n" + b"x" * 300 + b"\nlast\n"
    )
    (root / "b.jsonl").write_text(
        '{"text": "json one"}\n{"text": ""}\n{"body": "no text"}\nnot json\n{"text": "json two"}\n',
        encoding="utf-8",
    )
    (root / "c.json").write_text(
        json.dumps([{"id": "x1", "paragraphs": ["床前明月光", "疑是地上霜"]}]), encoding="utf-8"
    )
    return root


def test_documents_eos_and_bad_lines(messy, tokenizer_dir, tmp_path):
    report = prepare_data([messy], tokenizer_dir, tmp_path / "out", workers=1, max_line_bytes=256)
    sp = load_sentencepiece(tokenizer_dir)
    data = TokenFile.open(tmp_path / "out")
    assert data.tokens.dtype == np.uint16 and data.eos_id == 2
    docs = sp.decode(
        [list(map(int, d)) for d in np.split(data.tokens, np.where(data.tokens == 2)[0] + 1)[:-1]]
    )
    assert docs == ["first document", "second 中文", "last", "json one", "json two", "床前明月光\n疑是地上霜"]
    assert report.documents == 6 and report.tokens == len(data.tokens)
    skipped = {(s.file, s.line): s.reason for s in report.skipped}
    assert skipped[("a.txt", 2)] == "empty"
    assert skipped[("a.txt", 4)].startswith("invalid UTF-8: byte 0xff")
    assert skipped[("a.txt", 5)].startswith("over the size limit: 300")
    assert skipped[("b.jsonl", 2)] == "empty"
    assert skipped[("b.jsonl", 3)] == "no string field 'text'"
    assert skipped[("b.jsonl", 4)].startswith("invalid JSON")
    assert len(skipped) == 6
    listed = (tmp_path / "out" / "skipped.tsv").read_text(encoding="utf-8").splitlines()
    assert listed[0] == "file\tline\treason" and len(listed) == 7
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"] == {
        "empty": 2,
        "invalid UTF-8": 1,
        "over the size limit": 1,
        "no string field 'text'": 1,
        "invalid JSON": 1,
    }


def test_parallel_workers_write_the_same_file(messy, tokenizer_dir, tmp_path):
    prepare_data([messy], tokenizer_dir, tmp_path / "one", workers=1, val_every=2)
    prepare_data([messy], tokenizer_dir, tmp_path / "two", workers=2, val_every=2)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert TokenFile.open(tmp_path / "two", "val").tokens.size > 0


def test_real_corpus_sample(tokenizer_dir, tmp_path):
    # The first lines of one Chinese novel and of tiny Shakespeare, as prepare-data reads the real corpus.
    root = tmp_path / "corpus"
    root.mkdir()
    for parts in (("zh_classic_novels", "西游记.txt"), ("tinyshakespeare", "input.txt")):
        lines = shared_path("data", "pretrain_corpus", *parts).read_bytes().split(b"\n")[:200]
        (root / parts[-1]).write_bytes(b"\n".join(lines) + b"\n")
    report = prepare_data([root], tokenizer_dir, tmp_path / "out", workers=2)
    assert report.documents > 150 and report.tokens > 2000
    sp = load_sentencepiece(tokenizer_dir)
    text = sp.decode([int(t) for t in TokenFile.open(tmp_path / "out").tokens[:4000] if t != 2])
    assert "\ufeff" not in text  # 西游记 starts with a byte order mark, which is not text


def test_batches_are_deterministic_and_independent_of_the_rank_count():
    tokens = np.arange(64 * 10, dtype=np.uint16)
    one = PackedBatches(tokens, 64, micro_batch=4, seed=3)
    again = PackedBatches(tokens, 64, micro_batch=4, seed=3)
    other = PackedBatches(tokens, 64, micro_batch=4, seed=4)
    steps = range(6)  # 24 samples: more than the 10 windows, so it runs into a second and third epoch
    assert all((one.micro_batches(s)[0] == again.micro_batches(s)[0]).all() for s in steps)
    assert any((one.micro_batches(s)[0] != other.micro_batches(s)[0]).any() for s in steps)
    ranks = [
        PackedBatches(tokens, 64, micro_batch=1, grad_accum=2, world_size=2, rank=r, seed=3) for r in (0, 1)
    ]
    for step in steps:
        split = [b for r in ranks for b in r.micro_batches(step)]
        assert (np.concatenate(split) == one.micro_batches(step)[0].numpy()).all()
    # Every window exactly once per epoch.
    windows = sorted(one.window(i) for i in range(10))
    assert windows == list(range(10))
