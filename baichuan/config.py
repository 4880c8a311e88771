"""Model configuration and presets. Standard library only, so tools can read configs without torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ROPE = "rope"
ALIBI = "alibi"
POSITION_ENCODINGS = (ROPE, ALIBI)

BAICHUAN1_VOCAB = 64_000
BAICHUAN2_VOCAB = 125_696


class ConfigError(ValueError):
    """A config.json that cannot describe a Baichuan model, or whose clues contradict each other."""


@dataclass(frozen=True)
class Config:
    vocab_size: int = BAICHUAN2_VOCAB
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    ffn_dim: int = 11_008
    position: str = ROPE
    norm_head: bool = False
    max_seq_len: int = 4096
    rms_norm_eps: float = 1e-6
    rope_base: float = 10_000.0
    z_loss_weight: float = 0.0
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        # Sizes first: the divisibility checks below would divide by a zero head count.
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.position not in POSITION_ENCODINGS:
            raise ConfigError(f"position must be one of {POSITION_ENCODINGS}, got {self.position!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"hidden size {self.dim} is not divisible by {self.n_heads} heads")
        if self.position == ROPE and (self.dim // self.n_heads) % 2:
            raise ConfigError(f"RoPE needs an even head dimension, got {self.dim // self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """L·(4d² + 3d·f + 2d) + 2·V·d + d: untied embeddings, no biases, NormHead sized like a Linear."""
        d, f = self.dim, self.ffn_dim
        return self.n_layers * (4 * d * d + 3 * d * f + 2 * d) + 2 * self.vocab_size * d + d

    # --- the official config.json ------------------------------------------------------------------

    @classmethod
    def from_hf_dict(
        cls, hf: dict[str, Any], position: str | None = None, norm_head: bool | None = None
    ) -> Config:
        """Read an official (or our) Baichuan config.json. `position`/`norm_head` override the clues."""
        if not isinstance(hf, dict):
            raise ConfigError(f"expected a JSON object of settings, got a JSON {_json_type(hf)}")
        model_type = hf.get("model_type")
        if model_type not in (None, "baichuan"):
            raise ConfigError(f"model_type is {model_type!r}, expected 'baichuan'")
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
            )
            if k not in hf
        ]
        if missing:
            raise ConfigError(f"config.json lacks required keys: {', '.join(missing)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (Baichuan uses 'silu')")
        # Types are checked here, before any arithmetic, so that a hand-edited file gets a message naming the
        # key rather than a TypeError from deep inside.
        sizes = {
            key: _positive_int(hf, key)
            for key in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
            )
        }
        for key in ("model_max_length", "max_position_embeddings"):
            if hf.get(key) is not None:
                _positive_int(hf, key)
        max_len = hf.get("model_max_length") or hf.get("max_position_embeddings") or 4096
        return cls(
            vocab_size=sizes["vocab_size"],
            dim=sizes["hidden_size"],
            n_layers=sizes["num_hidden_layers"],
            n_heads=sizes["num_attention_heads"],
            ffn_dim=sizes["intermediate_size"],
            position=position or resolve_position(hf),
            norm_head=resolve_norm_head(hf) if norm_head is None else bool(norm_head),
            max_seq_len=int(max_len),
            rms_norm_eps=_number(hf, "rms_norm_eps", 1e-6),
            rope_base=_number(hf, "rope_theta", None) or 10_000.0,
            z_loss_weight=_number(hf, "z_loss_weight", None) or 0.0,
            pad_token_id=_token_id(hf, "pad_token_id", 0),
            bos_token_id=_token_id(hf, "bos_token_id", 1),
            eos_token_id=_token_id(hf, "eos_token_id", 2),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The official keys plus the two choices the originals leave implicit."""
        hf: dict[str, Any] = {
            "architectures": ["BaichuanForCausalLM"],
            "model_type": "baichuan",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "model_max_length": self.max_seq_len,
            "initializer_range": 0.02,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
            "use_cache": True,
            "position_encoding": self.position,
            "norm_head": self.norm_head,
            "z_loss_weight": self.z_loss_weight,
        }
        if self.position == ROPE:
            # The RoPE originals (and vLLM/llama.cpp converters) read max_position_embeddings.
            hf["max_position_embeddings"] = self.max_seq_len
            hf["rope_theta"] = self.rope_base
        return hf


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _positive_int(hf: dict[str, Any], key: str) -> int:
    value = hf[key]
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _number(hf: dict[str, Any], key: str, default: float | None) -> float | None:
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _token_id(hf: dict[str, Any], key: str, default: int) -> int:
    value = hf.get(key)
    if isinstance(value, list):  # some configs list several eos ids; the first is the canonical one
        value = value[0] if value else None
    if value is None:
        return default
    if not _is_int(value):
        raise ConfigError(f"{key} must be an integer token id, got {value!r}")
    return value


# The official shapes, to cross-check the key clues: (hidden, layers, heads) -> position encoding.
_OFFICIAL_SHAPES = {(4096, 32, 32): ROPE, (5120, 40, 40): ALIBI}


def resolve_position(hf: dict[str, Any]) -> str:
    """Decide RoPE or ALiBi for a config.json; the one place this is decided.

    The official configs never say it. Their clues: the Baichuan-7B code is `BaiChuanForCausalLM` (capital C);
    the RoPE codes (Baichuan-7B, Baichuan2-7B) read `max_position_embeddings` while the ALiBi codes
    (Baichuan-13B, Baichuan2-13B) read only `model_max_length`; and the official shapes (4096/32 layers are
    RoPE, 5120/40 layers are ALiBi). Our own configs state `position_encoding` explicitly.
    """
    explicit = hf.get("position_encoding")
    if explicit is not None:
        explicit = str(explicit).lower()
        if explicit not in POSITION_ENCODINGS:
            raise ConfigError(f"position_encoding must be one of {POSITION_ENCODINGS}, got {explicit!r}")
        return explicit

    clues: list[tuple[str, str]] = []
    if "BaiChuanForCausalLM" in (hf.get("architectures") or []):
        clues.append((ROPE, "architecture BaiChuanForCausalLM (the Baichuan-7B code)"))
    if "max_position_embeddings" in hf:
        clues.append((ROPE, "key max_position_embeddings (read only by the RoPE code)"))
    elif "model_max_length" in hf:
        clues.append((ALIBI, "only model_max_length, no max_position_embeddings (the ALiBi code)"))
    shape = (hf.get("hidden_size"), hf.get("num_hidden_layers"), hf.get("num_attention_heads"))
    if shape in _OFFICIAL_SHAPES:
        clues.append((_OFFICIAL_SHAPES[shape], f"official shape hidden/layers/heads {shape}"))

    votes = {p for p, _ in clues}
    if not votes:
        raise ConfigError(
            "config.json does not tell RoPE from ALiBi (no max_position_embeddings or model_max_length); "
            "pass position='rope' or 'alibi' explicitly"
        )
    if len(votes) > 1:
        detail = "; ".join(f"{why} -> {p}" for p, why in clues)
        raise ConfigError(
            f"config.json clues conflict on the position encoding ({detail}); pass position= explicitly"
        )
    return votes.pop()


def resolve_norm_head(hf: dict[str, Any]) -> bool:
    """Baichuan2 (NormHead) or Baichuan-1 (plain head): decided here only, from the config's clues."""
    if "norm_head" in hf:
        return bool(hf["norm_head"])
    baichuan2 = []
    if hf.get("vocab_size") == BAICHUAN2_VOCAB:
        baichuan2.append("vocab 125,696")
    if "z_loss_weight" in hf:
        baichuan2.append("z_loss_weight")
    if "max_position_embeddings" in hf and "model_max_length" in hf:
        baichuan2.append("both max-length keys (Baichuan2-7B)")
    if "tokenizer_class" in hf:
        baichuan2.append("tokenizer_class")
    baichuan1 = []
    if hf.get("vocab_size") == BAICHUAN1_VOCAB:
        baichuan1.append("vocab 64,000")
    if "BaiChuanForCausalLM" in (hf.get("architectures") or []):
        baichuan1.append("architecture BaiChuanForCausalLM")
    if baichuan1 and baichuan2:
        raise ConfigError(
            f"config.json clues conflict on the output head: Baichuan2 ({', '.join(baichuan2)}) "
            f"vs Baichuan-1 ({', '.join(baichuan1)}); pass norm_head= explicitly"
        )
    return bool(baichuan2)


PRESETS: dict[str, Config] = {
    # https://github.com/baichuan-inc/Baichuan-7B (BaiChuanConfig defaults)      -> 7,000,559,616 params
    "baichuan-7b": Config(
        vocab_size=BAICHUAN1_VOCAB, dim=4096, n_layers=32, n_heads=32, ffn_dim=11_008, position=ROPE
    ),
    # https://huggingface.co/baichuan-inc/Baichuan-13B-Base/blob/main/config.json -> 13,264,901,120
    "baichuan-13b": Config(
        vocab_size=BAICHUAN1_VOCAB, dim=5120, n_layers=40, n_heads=40, ffn_dim=13_696, position=ALIBI
    ),
    # https://huggingface.co/baichuan-inc/Baichuan2-7B-Base/blob/main/config.json -> 7,505,973,248
    "baichuan2-7b": Config(
        vocab_size=BAICHUAN2_VOCAB,
        dim=4096,
        n_layers=32,
        n_heads=32,
        ffn_dim=11_008,
        position=ROPE,
        norm_head=True,
    ),
    # https://huggingface.co/baichuan-inc/Baichuan2-13B-Base/blob/main/config.json -> 13,896,668,160
    "baichuan2-13b": Config(
        vocab_size=BAICHUAN2_VOCAB,
        dim=5120,
        n_layers=40,
        n_heads=40,
        ffn_dim=13_696,
        position=ALIBI,
        norm_head=True,
    ),
}


def preset(name: str) -> Config:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
