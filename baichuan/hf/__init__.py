"""The transformers face: config, model and tokenizer classes, registered with the Auto classes on import.

The only package that imports transformers. `import baichuan` imports it as soon as transformers is loaded.
"""

from __future__ import annotations

from baichuan.hf.config import BaichuanConfig
from baichuan.hf.model import BaichuanForCausalLM
from baichuan.hf.tokenizer import BaichuanTokenizer, BaichuanTokenizerFast


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM / AutoTokenizer resolve `model_type: baichuan` to our classes,
    so official checkpoints load without trust_remote_code."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    AutoConfig.register("baichuan", BaichuanConfig, exist_ok=True)
    AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
    AutoTokenizer.register(
        BaichuanConfig,
        slow_tokenizer_class=BaichuanTokenizer,
        fast_tokenizer_class=BaichuanTokenizerFast,
        exist_ok=True,
    )


register()

__all__ = ["BaichuanConfig", "BaichuanForCausalLM", "BaichuanTokenizer", "BaichuanTokenizerFast", "register"]
