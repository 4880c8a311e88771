"""baichuan-toolkit: the Baichuan model family (Baichuan-7B/13B, Baichuan2-7B/13B) in plain PyTorch.

`import baichuan` registers the transformers Auto classes (when transformers is installed), so official
checkpoint directories load with `AutoModelForCausalLM.from_pretrained(dir)` and no trust_remote_code.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
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
    "tokenize_conversation": "baichuan.train.sft_data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'baichuan' has no attribute {name!r}")


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Registers our Auto classes right after transformers is first imported.

    transformers takes seconds to import; the core, the CLI and the server do not need it, so `import baichuan`
    registers eagerly only if transformers is already loaded, and otherwise the moment it is."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _register_with_transformers()

            spec.loader.exec_module = exec_module
        return spec


def _register_with_transformers() -> None:
    # baichuan.hf registers itself at the end of its import. If it is being imported right now (it is what
    # imported transformers), it will do so when it finishes.
    if "baichuan.hf" not in sys.modules:
        importlib.import_module("baichuan.hf")


if sys.modules.get("transformers") is not None:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterWhenTransformersLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())

__all__ = ["PRESETS", "Config", *_LAZY]
