"""The transformers face of the core model: `BaichuanForCausalLM` (PreTrainedModel + GenerationMixin).

A thin adapter: the modules are the core ones from `baichuan.model`, so parameter names are the official
ones and `AutoModelForCausalLM`, `generate`, peft and Trainer work without remote code.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from baichuan.checkpoint import fold_norm_head, load_into
from baichuan.hf.config import BaichuanConfig
from baichuan.hugepages import move_to_huge_pages
from baichuan.model import (
    Baichuan,
    BaichuanModel,
    DecoderLayer,
    NormHead,
    RMSNorm,
    build_head,
    causal_lm_loss,
)
from baichuan.tokenizer import Tokenizer

# The name the installed transformers gives the cache in model outputs (and reads back for the next step).
OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class _TransformersCache:
    """Presents a transformers `Cache` through the core model's `update(layer, start, k, v)` protocol."""

    def __init__(self, cache: Cache):
        self.cache = cache

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, layer)


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    config: BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    # Baichuan-7B checkpoints carry a persistent RoPE buffer that is not a weight.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, NormHead)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.core_config = config.to_core()
        self.model = BaichuanModel(self.core_config)
        self.lm_head = build_head(self.core_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers: int = 1
    ) -> None:
        # The trunk recomputes every layer with its own checkpointing (as the plain-PyTorch core trains), so a
        # custom checkpoint function has nothing to replace; a sparser recompute is not offered.
        if enable and every_n_layers != 1:
            raise ValueError(
                f"Baichuan recomputes every decoder layer; every_n_layers={every_n_layers} is not supported"
            )
        # transformers wraps torch's checkpoint in a partial; anything else (its `offload=True` since 5.25) would
        # be silently dropped here, so it is refused.
        function = getattr(gradient_checkpointing_func, "func", gradient_checkpointing_func)
        if enable and function not in (None, torch.utils.checkpoint.checkpoint):
            raise ValueError(
                "Baichuan recomputes each decoder layer with torch.utils.checkpoint itself: activation offloading "
                "and custom checkpoint functions are not supported"
            )
        self.model.gradient_checkpointing = enable

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        # transformers renamed the cache argument `past_key_values` -> `cache` (5.24 passes `cache`); take either:
        # `generate` passes the name its version uses, and older callers still pass the old one.
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
            cache = past_key_values
        # position_ids are accepted and not needed: RoPE sees relative offsets only, so positions counted
        # with or without left padding give the same logits for real tokens (checked against the originals).
        if inputs_embeds is not None:
            raise ValueError("BaichuanForCausalLM takes input_ids; inputs_embeds is not supported")
        if input_ids is None:
            raise ValueError("input_ids is required")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.model.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        start = cache.get_seq_length() if cache is not None else 0

        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # all real tokens: let the model take its mask-free fast path
        if attention_mask is not None and attention_mask.shape[-1] != start + input_ids.shape[1]:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions; expected past ({start}) + new "
                f"({input_ids.shape[1]})"
            )

        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        core_cache = _TransformersCache(cache) if cache is not None else None
        x = self.model(input_ids, start, core_cache, attention_mask, hidden_states)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)

        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.core_config.z_loss_weight)
        if hidden_states is not None:
            # The official tuple: embeddings, the output of every layer but the last, then the final norm.
            hidden_states = tuple(hidden_states)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=hidden_states,
            **{OUTPUT_CACHE_FIELD: cache if use_cache else None},
        )

    # --- quantization --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *args,
        quantize: int | None = None,
        group_size: int = 128,
        **kwargs,
    ):
        """transformers' loader, plus `quantize=8|4` (quantized while loading, shard by shard) and our saved
        quantized checkpoints and the official bitsandbytes NF4 ones, which take our own streaming loader."""
        directory = Path(str(pretrained_model_name_or_path))
        hf = json.loads((directory / "config.json").read_text(encoding="utf-8")) if directory.is_dir() else {}
        if quantize is None and not (hf.get("quantization") or hf.get("quantization_config")):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        device = kwargs.pop("device_map", None) or "cpu"
        if not isinstance(device, (str, torch.device)):
            raise ValueError("quantized loading takes one device (device_map='cpu', 'cuda', ...)")
        config = BaichuanConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = cls(config)
        load_into(
            model,
            directory,
            model.core_config,
            dtype if dtype != "auto" else None,
            device,
            quantize,
            group_size,
        )
        model.config.quantization = model.quantization
        return model.eval()

    def quantize(self, bits: int, group_size: int = 128) -> BaichuanForCausalLM:
        """Weight-only int8/int4 in place, on CPU or CUDA: the originals' `model.quantize(8|4)`, which here also
        saves and reloads (`save_pretrained`, then `from_pretrained`)."""
        from baichuan.quant.swap import quantize_model

        fold_norm_head(self)  # quantize the normalised head rows, never the raw NormHead weight
        self.quantization = self.config.quantization = quantize_model(self, bits, group_size)
        move_to_huge_pages(self)  # as a quantizing load leaves its modules (checkpoint.load_into)
        return self

    # --- the originals' chat API ------------------------------------------------------------------------

    @torch.no_grad()
    def chat(self, tokenizer, messages: list[dict[str, str]], stream: bool = False, generation_config=None):
        """Drop-in for the original `model.chat`: the answer as a string, or with stream=True an iterator of the
        growing answer text (as the original yields it). Sampling follows `generation_config` (default: the
        checkpoint's generation_config.json); the role ids always come from the checkpoint's, as in the original."""
        from baichuan.chat_format import chat_format_for
        from baichuan.generate import SamplingConfig
        from baichuan.generate import chat as chat_engine

        core_tokenizer = _core_tokenizer(tokenizer)
        sampling = SamplingConfig.from_generation_config(
            generation_config or self.generation_config, vocab_size=core_tokenizer.vocab_size
        )
        chat_format = chat_format_for(self.config, self.generation_config)
        answer = chat_engine(
            self._inference_view(), core_tokenizer, messages, sampling, stream, chat_format=chat_format
        )
        return itertools.accumulate(answer) if stream else answer

    def _inference_view(self) -> Baichuan:
        """The core model over these modules, with the NormHead folded once (re-folded if the head changes)."""
        key = (self.lm_head.weight.data_ptr(), self.lm_head.weight._version, self.lm_head.weight.dtype)
        cached = self.__dict__.get("_folded_head")  # kept out of the module tree, so never saved
        if cached is None or cached[0] != key:
            view = Baichuan.from_modules(self.core_config, self.model, self.lm_head)
            cached = self.__dict__["_folded_head"] = (key, fold_norm_head(view).lm_head)
        return Baichuan.from_modules(self.core_config, self.model, cached[1])


def _core_tokenizer(tokenizer) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if not vocab_file:
        raise ValueError(
            "chat needs the tokenizer's SentencePiece file (tokenizer.vocab_file) to decode streams"
        )
    return Tokenizer(vocab_file)


__all__ = ["BaichuanForCausalLM", "BaichuanPreTrainedModel", "DecoderLayer"]
