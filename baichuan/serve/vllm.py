"""`baichuan serve --engine vllm`: the same checkpoint behind vLLM's OpenAI server, for GPU machines.

vLLM has Baichuan models of its own; it reads our saved directories (official names and layout). We run its
server in this process after `import baichuan`, so that AutoTokenizer finds our tokenizer class without
remote code.

vLLM does not read the position encoding or the head we write into config.json: it guesses both from magic
numbers (vllm/model_executor/models/baichuan.py). `BaichuanForCausalLM` (what we save, and Baichuan-13B and
Baichuan2 ship) is RoPE when hidden_size == 4096 and ALiBi otherwise; `BaiChuanForCausalLM` (Baichuan-7B) is
always RoPE; and the head's rows are L2-normalised on load when vocab_size == 125696 (Baichuan2's NormHead). The
four official models satisfy these guesses. A model of our own may not (a RoPE model of another width, a plain
head over Baichuan2's vocabulary), and vLLM would then serve wrong answers without a word, so `vllm_refusal`
checks a directory first. Our int8/int4 directories are a format vLLM does not know.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from pathlib import Path

import torch

from baichuan.checkpoint import SAFETENSORS_INDEX, iter_tensors, read_config, read_json, weight_files
from baichuan.config import ROPE

VLLM_ROPE_HIDDEN_SIZE = 4096  # BaichuanForCausalLM: RoPE at this width, ALiBi at any other
VLLM_NORM_HEAD_VOCAB = 125_696  # the head is L2-normalised on load at exactly this vocabulary size
_UNIT_ROWS_CHECKED = 256  # rows of lm_head whose norms show whether it is already normalised


def vllm_argv(
    model_dir: str | os.PathLike,
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    max_seq_len: int | None,
    model_name: str | None,
    dtype: str,
) -> list[str]:
    argv = ["--model", str(model_dir), "--host", host, "--port", str(port), "--max-num-seqs", str(max_batch)]
    if api_key:
        argv += ["--api-key", api_key]
    if max_seq_len:
        argv += ["--max-model-len", str(max_seq_len)]
    if model_name:
        argv += ["--served-model-name", model_name]
    if dtype != "auto":
        argv += ["--dtype", {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)]
    return argv


def _head_rows_are_unit(directory: Path) -> bool:
    """Whether the first rows of lm_head.weight have norm 1 (a folded NormHead), read without loading the rest."""
    files = weight_files(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        shard = read_json(index).get("weight_map", {}).get("lm_head.weight")
        files = [directory / shard] if shard else files
    for path in files:
        for name, tensor in iter_tensors(path):
            if name == "lm_head.weight":
                norms = tensor[:_UNIT_ROWS_CHECKED].float().norm(dim=-1)
                return bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-2))
    return False


def vllm_refusal(model_dir: str | os.PathLike) -> str | None:
    """Why vLLM would load this directory wrongly or not at all (one line that says what to do), or None."""
    directory = Path(model_dir)
    config = read_config(directory)
    hf = read_json(directory / "config.json")
    if hf.get("quantization"):
        bits = hf["quantization"].get("bits", "?")
        return (
            f"vLLM cannot load this toolkit's {bits}-bit weight-only format ({directory}): serve the float "
            "checkpoint with vLLM (which has quantizations of its own), or this one with --engine baichuan"
        )
    architecture = (hf.get("architectures") or ["BaichuanForCausalLM"])[0]
    vllm_rope = architecture == "BaiChuanForCausalLM" or config.dim == VLLM_ROPE_HIDDEN_SIZE
    if vllm_rope != (config.position == ROPE):
        return (
            f"vLLM would run this {config.position} model with {'RoPE' if vllm_rope else 'ALiBi'}: it picks the "
            f"position encoding of {architecture} by hidden_size == {VLLM_ROPE_HIDDEN_SIZE} "
            f"(this model's is {config.dim}); use --engine baichuan"
        )
    vllm_normalises = config.vocab_size == VLLM_NORM_HEAD_VOCAB
    if vllm_normalises != config.norm_head and not _head_rows_are_unit(directory):
        rule = f"it decides by vocab_size == {VLLM_NORM_HEAD_VOCAB} (this model's is {config.vocab_size})"
        if vllm_normalises:
            return f"vLLM would normalise the rows of this plain head: {rule}; use --engine baichuan"
        return (
            f"vLLM would not normalise this NormHead: {rule}; fold it into normalised rows first "
            "(baichuan convert --migrate-head), or use --engine baichuan"
        )
    return None


def run_vllm(argv: list[str]) -> None:
    refusal = vllm_refusal(argv[argv.index("--model") + 1])
    if refusal:
        raise ValueError(refusal)
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--engine vllm needs vLLM installed (pip install vllm) on a machine with a CUDA GPU")
    if not torch.cuda.is_available():
        raise ValueError("--engine vllm needs a CUDA GPU, and this torch sees none; use the default engine")
    import transformers  # noqa: F401  (with baichuan imported, this registers our Auto classes)

    import baichuan  # noqa: F401

    sys.argv = ["vllm-openai", *argv]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
