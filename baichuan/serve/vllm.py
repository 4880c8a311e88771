"""`baichuan serve --engine vllm`: the same checkpoint behind vLLM's OpenAI server, for GPU machines.

vLLM has Baichuan models of its own; it reads our saved directories (official names and layout). We run its
server in this process after `import baichuan`, so that AutoTokenizer finds our tokenizer class without
remote code.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys


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


def run_vllm(argv: list[str]) -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--engine vllm needs vLLM installed (pip install vllm) on a machine with a CUDA GPU")
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--engine vllm needs a CUDA GPU, and this torch sees none; use the default engine")
    import transformers  # noqa: F401  (with baichuan imported, this registers our Auto classes)

    import baichuan  # noqa: F401

    sys.argv = ["vllm-openai", *argv]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
