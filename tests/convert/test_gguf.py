"""GGUF export and import: ours -> GGUF -> ours gives the same logits; the file holds what llama.cpp's baichuan
architecture reads (the tensors, the RoPE pair layout, the folded head, the vocabulary, the chat template);
models llama.cpp would run with another position encoding are refused; the real vocabulary-only GGUF imports
to a tokenizer that encodes as the original. Running llama.cpp itself on these files is
benchmarks/check_gguf_llamacpp.py (llama-cpp-python builds for too long for CI)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from baichuan.config import ALIBI, ROPE
from baichuan.convert.formats import ConvertError
from baichuan.convert.gguf import _interleave_rope, export_gguf, import_gguf, read_gguf_header
from baichuan.position import RoPE
from baichuan.scaffold import init_checkpoint
from tests.conftest import shared_path
from tests.convert.conftest import llama_cpp_config, logits, sample_ids

gguf = pytest.importorskip("gguf")
TEXTS = ["Hello world, 你好世界!", "  two  spaces\tand a tab\n", "数字 12345 and <s> </s> 写作"]


def _reader(path):
    return gguf.GGUFReader(str(path))


def _value(reader, key):
    return reader.fields[key].contents()


def test_round_trip_f32_gives_equal_logits(llama_cpp_model, tmp_path):
    path = export_gguf(llama_cpp_model, tmp_path / "m.gguf", "f32")
    back = import_gguf(path, tmp_path / "back")
    ids = sample_ids()
    assert torch.equal(logits(llama_cpp_model, ids), logits(back, ids))
    ours = spm.SentencePieceProcessor(model_file=str(llama_cpp_model / "tokenizer.model"))
    theirs = spm.SentencePieceProcessor(model_file=str(back / "tokenizer.model"))
    assert [theirs.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert (back / "tokenizer.model").read_bytes() == (llama_cpp_model / "tokenizer.model").read_bytes()
    config = json.loads((back / "config.json").read_text())
    source = json.loads((llama_cpp_model / "config.json").read_text())
    assert config["position_encoding"] == source["position_encoding"]
    assert config["norm_head"] is False  # folded into the rows, which give the same logits


def test_file_holds_what_llama_cpp_reads(llama_cpp_model, tmp_path):
    config = json.loads((llama_cpp_model / "config.json").read_text())
    reader = _reader(export_gguf(llama_cpp_model, tmp_path / "m.gguf", "f32"))
    assert _value(reader, "general.architecture") == "baichuan"
    assert _value(reader, "baichuan.block_count") == config["num_hidden_layers"]
    assert _value(reader, "baichuan.context_length") == 128
    assert (
        _value(reader, "baichuan.rope.dimension_count")
        == config["hidden_size"] // config["num_attention_heads"]
    )
    if config["position_encoding"] == ALIBI:
        assert _value(reader, "baichuan.attention.max_alibi_bias") == 8.0
    else:
        assert _value(reader, "baichuan.rope.freq_base") == 10_000.0
    tokens = _value(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"] and tokens[:3] == ["<unk>", "<s>", "</s>"]
    types = _value(reader, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[-1] == gguf.TokenType.UNUSED  # padding rows past the 4,000 pieces
    assert (_value(reader, "tokenizer.ggml.bos_token_id"), _value(reader, "tokenizer.ggml.eos_token_id")) == (
        1,
        2,
    )
    template = _value(reader, "tokenizer.chat_template")
    assert "message['content']" in template and tokens[195] in template and tokens[196] in template
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * config["num_hidden_layers"] and "blk.0.attn_q.weight" in tensors
    out = np.array(tensors["output.weight"].data).reshape(config["vocab_size"], config["hidden_size"])
    if config["norm_head"]:  # NormHead folded: unit rows
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("type", ["f32", "q4_0"])
def test_header_reads_as_gguf_reads_it(type, tmp_path, tokenizer_file):
    """The import's own header reader against gguf's GGUFReader: every field's value, and every tensor's shape,
    type and data offset."""
    directory = init_checkpoint(
        llama_cpp_config(ALIBI, True), tmp_path / "m", torch.float32, tokenizer=tokenizer_file
    )
    path = export_gguf(directory, tmp_path / "m.gguf", type)
    header, reader = read_gguf_header(path), _reader(path)
    assert header.fields == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert {t.name: (t.shape, t.type, t.offset) for t in header.tensors.values()} == {
        t.name: (tuple(reversed(t.shape.tolist())), int(t.tensor_type), t.data_offset) for t in reader.tensors
    }


def _as_llama_cpp_converts(path, out, n_heads: int):
    """A copy of our GGUF as llama.cpp's converter writes one: the q and k rows permuted (ALiBi models' too),
    none of our own keys."""
    reader = _reader(path)
    writer = gguf.GGUFWriter(str(out), "baichuan")
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "baichuan_toolkit.")) or key == "general.architecture":
            continue
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if array else None)
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            data = _interleave_rope(torch.from_numpy(data), n_heads).numpy()
        writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_llama_cpp_alibi_gguf_imports_with_the_original_rows(tmp_path, tokenizer_file):
    """llama.cpp's converter permutes q and k of a 13B (ALiBi) model as of a 7B: the import undoes it, so the
    checkpoint has the original W_pack (not only the same scores)."""
    config = llama_cpp_config(ALIBI, False)
    directory = init_checkpoint(config, tmp_path / "m", torch.float32, tokenizer=tokenizer_file)
    ours = export_gguf(directory, tmp_path / "m.gguf", "f32")
    theirs = _as_llama_cpp_converts(ours, tmp_path / "llama-cpp.gguf", config.n_heads)
    q = [
        next(np.array(t.data) for t in _reader(f).tensors if t.name == "blk.0.attn_q.weight")
        for f in (ours, theirs)
    ]
    assert not np.array_equal(*q)
    back = import_gguf(theirs, tmp_path / "back")
    name = "model.layers.0.self_attn.W_pack.weight"
    with (
        safe_open(str(directory / "model.safetensors"), "pt") as a,
        safe_open(str(back / "model.safetensors"), "pt") as b,
    ):
        assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    ids = sample_ids()
    assert torch.equal(logits(directory, ids), logits(back, ids))


def test_cut_or_foreign_files_are_refused_before_writing(tmp_path, tokenizer_file):
    directory = init_checkpoint(
        llama_cpp_config(ROPE, False), tmp_path / "m", torch.float32, tokenizer=tokenizer_file
    )
    data = export_gguf(directory, tmp_path / "m.gguf", "f16").read_bytes()
    cases = [
        (data[:-100], "runs past the end of the file"),  # the head's last rows are missing
        (data[:1000], "header is cut short"),  # inside the vocabulary
        (b"GGUF" + (1).to_bytes(4, "little") + bytes(16), "GGUF version 1"),
        (b"PK\x03\x04 not a GGUF at all", "not a GGUF file"),
        (b"", "not a readable GGUF file"),
    ]
    for i, (content, says) in enumerate(cases):
        (tmp_path / f"{i}.gguf").write_bytes(content)
        with pytest.raises(ConvertError, match=says):
            import_gguf(tmp_path / f"{i}.gguf", tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_rope_layout_is_llama_cpp_pairs(tmp_path, tokenizer_file):
    """The GGUF's q/k rows, rotated as llama.cpp's "normal" RoPE rotates them (consecutive pairs), give the
    same attention scores as ours (rotate-half) on the checkpoint's rows: the layout llama.cpp needs."""
    config = llama_cpp_config(ROPE, False)
    head_dim, heads = config.head_dim, config.n_heads
    w = torch.randn(2 * config.dim, config.dim, dtype=torch.float64)
    wq, wk = w.chunk(2)
    x = torch.randn(6, config.dim, dtype=torch.float64)
    pos = torch.arange(6)
    rope = RoPE(head_dim, config.rope_base, 64)

    def heads_of(y):  # (T, H*D) -> (1, H, T, D)
        return y.view(6, heads, head_dim).transpose(0, 1)[None]

    q, k = rope.rotate(heads_of(x @ wq.T).float(), heads_of(x @ wk.T).float(), pos)
    ours = q @ k.transpose(-1, -2)

    def pairs(y):  # llama.cpp: rotate (y[2i], y[2i+1]) by pos * base^(-2i/D)
        theta = config.rope_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angle = pos[:, None].double() * theta  # (T, D/2)
        a, b = y[..., 0::2], y[..., 1::2]
        out = torch.empty_like(y)
        out[..., 0::2] = a * angle.cos() - b * angle.sin()
        out[..., 1::2] = a * angle.sin() + b * angle.cos()
        return out

    gq, gk = _interleave_rope(wq, heads), _interleave_rope(wk, heads)
    theirs = pairs(heads_of(x @ gq.T)) @ pairs(heads_of(x @ gk.T)).transpose(-1, -2)
    torch.testing.assert_close(theirs.float(), ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "type, tolerance", [("f16", 2e-2), ("bf16", 1e-1), ("q8_0", 1e-1), ("q4_0", 1.5)], ids=lambda v: str(v)
)
def test_types_and_their_error(type, tolerance, tmp_path, tokenizer_file):
    """Each tensor type: matrices stored in it (norms stay F32), and the imported weights give logits near the
    originals (the tolerance is the type's rounding, on logits of a random 32-layer model)."""
    directory = init_checkpoint(
        llama_cpp_config(ROPE, True), tmp_path / "m", torch.float32, tokenizer=tokenizer_file
    )
    path = export_gguf(directory, tmp_path / f"m.{type}.gguf", type)
    kinds = {t.name: t.tensor_type.name for t in _reader(path).tensors}
    assert (
        kinds["blk.0.attn_q.weight"] == kinds["output.weight"] == kinds["token_embd.weight"] == type.upper()
    )
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == "F32"
    back = import_gguf(path, tmp_path / "back", dtype=torch.float32)
    ids = sample_ids()
    diff = (logits(directory, ids) - logits(back, ids)).abs().max().item()
    assert 0 < diff < tolerance


@pytest.mark.parametrize(
    "position, layers, says",
    [(ROPE, 2, "no position encoding"), (ALIBI, 32, "with ROPE"), (ROPE, 40, "with ALIBI")],
)
def test_refuses_what_llama_cpp_would_run_differently(position, layers, says, tmp_path, tokenizer_file):
    config = llama_cpp_config(position, False).replace(n_layers=layers)
    directory = init_checkpoint(config, tmp_path / "m", torch.float32, tokenizer=tokenizer_file)
    with pytest.raises(ConvertError, match=says):
        export_gguf(directory, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written left behind
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "baichuan.cli",
            "convert",
            "-m",
            str(directory),
            "--to",
            "gguf",
            "--out",
            str(tmp_path / "x.gguf"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert (
        run.stderr.startswith("error:") and says in run.stderr and len(run.stderr.strip().splitlines()) <= 3
    )


@pytest.mark.parametrize("reading, key", [("baichuan", "ids"), ("llamacpp", "ids_llamacpp")])
def test_vocabulary_only_gguf_imports_as_the_original(reading, key, tmp_path):
    """llama.cpp's real Baichuan vocabulary GGUF -> tokenizer.model: the ids of the original tokenizer (the
    oracle's, from ../shared) on every public case, for both readings of the vocabulary."""
    source = shared_path("data", "baichuan-7b-tokenizer", "ggml-vocab-baichuan.gguf")
    cases = [json.loads(line) for line in shared_path("oracle", "tokenizer", "cases_public.jsonl").open()]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "model.safetensors").write_bytes(b"weights already there")
    out = import_gguf(source, tmp_path / "tok", reading=reading)
    assert sorted(p.name for p in out.iterdir()) == [
        "model.safetensors",  # a vocabulary import replaces the tokenizer files only
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert (out / "model.safetensors").read_bytes() == b"weights already there"
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert processor.vocab_size() == 64_000
    assert [processor.encode(case["text"]) for case in cases] == [case[key] for case in cases]
    original = "tokenizer.model" if reading == "baichuan" else "tokenizer-llamacpp.model"
    reference = spm.SentencePieceProcessor(
        model_file=str(shared_path("data", "baichuan-7b-tokenizer", original))
    )
    lines = []
    for name in ("zho_simpl.devtest", "eng.devtest"):
        path = shared_path("data", "flores101", "flores101_dataset", "devtest", name)
        lines += path.read_text(encoding="utf-8").splitlines()[:300]
    assert [processor.encode(line) for line in lines] == [reference.encode(line) for line in lines]
