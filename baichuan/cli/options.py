"""The flags that several commands share, as annotated types."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelDir = Annotated[Path, typer.Option("--model", "-m", help="Checkpoint directory (official or ours).")]
Device = Annotated[str, typer.Option(help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")]
Dtype = Annotated[
    str,
    typer.Option(
        help="auto (bf16 where the hardware computes it natively, else fp32/fp16), bf16, fp16, fp32."
    ),
]
MaxNew = Annotated[
    int | None, typer.Option(help="Most tokens to generate (default: generation_config.json's).")
]
Temperature = Annotated[float | None, typer.Option(help="Sampling temperature (default: the checkpoint's).")]
TopK = Annotated[int | None, typer.Option(help="Top-k sampling, 0 = off (default: the checkpoint's).")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling (default: the checkpoint's).")]
Penalty = Annotated[float | None, typer.Option(help="Repetition penalty (default: the checkpoint's).")]
Seed = Annotated[int | None, typer.Option(help="Random seed, for reproducible sampling.")]
Greedy = Annotated[bool, typer.Option(help="Greedy decoding instead of sampling.")]
Quantize = Annotated[
    int | None, typer.Option(help="Quantize the weights while loading: 8 or 4 bits (weight-only).")
]
Lora = Annotated[
    Path | None,
    typer.Option(
        help="A LoRA adapter directory (baichuan finetune --lora, or peft) for this --model: merged into its float "
        "layers, added beside quantized ones."
    ),
]


KvDtype = Annotated[
    str,
    typer.Option(
        help="KV cache dtype: auto (bf16 on CPU even where compute is fp32; the compute dtype on GPU), bf16, "
        "fp16, fp32."
    ),
]
Context = Annotated[
    int | None,
    typer.Option(
        "--max-seq-len",
        min=2,
        help="Context of this run in positions (default: the model's, shortened to what fits in memory).",
    ),
]
