"""A minimal Baichuan -> GGUF exporter, so the benchmark can run llama.cpp on exactly our weights.

    python benchmarks/gguf_export.py CHECKPOINT_DIR out.gguf --dtype bf16

It writes what llama.cpp's own converter (`convert_hf_to_gguf.py`, class BaichuanModel) writes for arch
`baichuan`: W_pack split into attn_q/k/v, and for RoPE models q and k permuted from the rotate-half layout of
the checkpoints to the interleaved pairs of llama.cpp's "normal" RoPE. The tokenizer is the checkpoint's
SentencePiece model, padded with unused pieces up to the model's vocabulary as the converter does.

llama.cpp decides RoPE vs ALiBi from the layer count alone (32 layers: 7B with RoPE; 40 layers: 13B with
ALiBi; anything else: neither), so other shapes load and time correctly but compute different numbers.
Baichuan2's NormHead is folded first (llama.cpp's converter does not normalise the head).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from baichuan.checkpoint import fold_norm_head, load_model
from baichuan.config import ALIBI, ROPE, Config
from baichuan.model import Baichuan

# llama.cpp's n_layer -> model type, which picks the position encoding in its baichuan graph.
LLAMA_CPP_POSITION = {32: ROPE, 40: ALIBI}


def llama_cpp_matches(config: Config) -> bool:
    """Whether llama.cpp will compute the same function as our model for this config."""
    return LLAMA_CPP_POSITION.get(config.n_layers) == config.position


def _interleave_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Rows of each head go from (first halves, second halves) to interleaved (x0, x_half, x1, ...) pairs,
    # the inverse of the HF permutation (llama.cpp's `_reverse_hf_permute`).
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: Baichuan):
    config = model.config
    state = model.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    yield "output_norm.weight", state["model.norm.weight"]
    yield "output.weight", state["lm_head.weight"]
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        q, k, v = state[p + "self_attn.W_pack.weight"].chunk(3, dim=0)
        if config.position == ROPE:
            q, k = _interleave_rope(q, config.n_heads), _interleave_rope(k, config.n_heads)
        yield f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"]
        yield f"blk.{i}.attn_q.weight", q
        yield f"blk.{i}.attn_k.weight", k
        yield f"blk.{i}.attn_v.weight", v
        yield f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"]
        yield f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"]


def _add_vocab(writer, tokenizer_model: Path, vocab_size: int) -> None:
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (
            gguf.TokenType.UNKNOWN
            if sp.IsUnknown(i)
            else gguf.TokenType.CONTROL
            if sp.IsControl(i)
            else gguf.TokenType.BYTE
            if sp.IsByte(i)
            else gguf.TokenType.NORMAL
        )
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def export_gguf(
    model: Baichuan,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_model: str | os.PathLike | None = None,
) -> Path:
    """Write `model` (weights cast to `dtype`: bf16, fp16 or fp32; norms stay fp32) as a GGUF file."""
    import gguf

    qtype = {
        torch.bfloat16: gguf.GGMLQuantizationType.BF16,
        torch.float16: gguf.GGMLQuantizationType.F16,
        torch.float32: gguf.GGMLQuantizationType.F32,
    }[dtype]
    file_type = {
        torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16,
        torch.float16: gguf.LlamaFileType.MOSTLY_F16,
        torch.float32: gguf.LlamaFileType.ALL_F32,
    }[dtype]
    model = fold_norm_head(model)
    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BAICHUAN])
    writer.add_name("baichuan-export")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer_model is not None:
        _add_vocab(writer, Path(tokenizer_model), config.vocab_size)
        writer.add_bos_token_id(config.bos_token_id)
        writer.add_eos_token_id(config.eos_token_id)
        writer.add_pad_token_id(config.pad_token_id)
        writer.add_add_bos_token(False)
    for name, tensor in _tensors(model):
        tensor = tensor.detach()
        if tensor.dim() == 1:  # llama.cpp keeps norm weights in fp32
            writer.add_tensor(name, tensor.float().numpy())
        elif dtype == torch.bfloat16:
            bits = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
            writer.add_tensor(name, bits, raw_shape=bits.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, tensor.to(dtype).contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a Baichuan checkpoint directory")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = load_model(args.checkpoint, dtype=dtype)
    tokenizer = args.checkpoint / "tokenizer.model"
    export_gguf(model, args.out, dtype, tokenizer if tokenizer.is_file() else None)
    if not llama_cpp_matches(model.config):
        print(
            f"note: llama.cpp picks its position encoding from the layer count; with {model.config.n_layers} "
            f"layers it will not compute this {model.config.position} model exactly (timings still hold)"
        )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
