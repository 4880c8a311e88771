"""`BaichuanConfig`: the transformers config class, reading the official config.json keys."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from baichuan.config import ALIBI, ROPE, Config, ConfigError, preset, resolve_norm_head, resolve_position


class BaichuanConfig(PreTrainedConfig):
    """Official Baichuan config keys, plus `position_encoding` and `norm_head`, which the originals leave to
    their code and which we resolve from the config's clues once (see `baichuan.config.resolve_position`)
    and then always write out explicitly."""

    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 125_696
    hidden_size: int = 4096
    intermediate_size: int = 11_008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int | None = None
    model_max_length: int | None = None
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    z_loss_weight: float | None = None
    position_encoding: str | None = None
    norm_head: bool | None = None

    def __post_init__(self, **kwargs: Any):
        # The 13B configs carry `gradient_checkpointing: [false]`, a leftover of a tuple bug; it means nothing.
        kwargs.pop("gradient_checkpointing", None)
        clues = {k: v for k, v in kwargs.items() if k == "tokenizer_class"}
        clues.update(
            {
                k: getattr(self, k)
                for k in (
                    "architectures",
                    "max_position_embeddings",
                    "model_max_length",
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "vocab_size",
                    "z_loss_weight",
                    "position_encoding",
                    "norm_head",
                )
                if getattr(self, k) is not None
            }
        )
        try:
            self.position_encoding = resolve_position(clues)
        except ConfigError:
            if self.max_position_embeddings is not None or self.model_max_length is not None:
                raise
            self.position_encoding = ROPE  # a config built in code with no clue at all: the 7B default
        self.norm_head = resolve_norm_head(clues)
        if self.position_encoding == ROPE and self.max_position_embeddings is None:
            self.max_position_embeddings = self.model_max_length or 4096
        if self.model_max_length is None:
            self.model_max_length = self.max_position_embeddings
        super().__post_init__(**kwargs)

    def to_core(self) -> Config:
        return Config.from_hf_dict(self.to_dict())

    @classmethod
    def from_core(cls, config: Config, **kwargs: Any) -> BaichuanConfig:
        hf = config.to_hf_dict()
        hf.pop("model_type")
        hf.update(kwargs)
        return cls(**hf)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BaichuanConfig:
        """`BaichuanConfig.from_preset("baichuan2-13b")`; overrides use the official key names."""
        config = cls.from_core(preset(name))
        for key, value in overrides.items():
            setattr(config, key, value)
        return config


__all__ = ["BaichuanConfig", "ALIBI", "ROPE"]
