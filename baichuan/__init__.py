"""baichuan-toolkit: the Baichuan model family (Baichuan-7B/13B, Baichuan2-7B/13B) in plain PyTorch.

`import baichuan` registers the transformers Auto classes (when transformers is installed), so official
checkpoint directories load with `AutoModelForCausalLM.from_pretrained(dir)` and no trust_remote_code.
"""

from __future__ import annotations

import importlib
from typing import Any

from baichuan.config import PRESETS, Config

__version__ = "0.1.0"

_LAZY = {
    "BaichuanConfig": "baichuan.hf.config",
    "BaichuanForCausalLM": "baichuan.hf.model",
    "BaichuanTokenizer": "baichuan.hf.tokenizer",
    "BaichuanTokenizerFast": "baichuan.hf.tokenizer",
    "Baichuan": "baichuan.model",
    "KVCache": "baichuan.kv_cache",
    "Tokenizer": "baichuan.tokenizer",
    "load_model": "baichuan.checkpoint",
    "save_model": "baichuan.checkpoint",
    "fold_norm_head": "baichuan.checkpoint",
    "build_chat_input": "baichuan.chat_format",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'baichuan' has no attribute {name!r}")


def _register_with_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:  # the core works without transformers
        return
    from baichuan.hf import register

    register()


_register_with_transformers()

__all__ = ["PRESETS", "Config", *_LAZY]
