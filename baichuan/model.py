"""The Baichuan decoder in plain PyTorch: one model class for Baichuan-7B/13B and Baichuan2-7B/13B.

Module and parameter names are the official ones (`model.layers.{i}.self_attn.W_pack`, ...), so official
checkpoints load without a key map and LoRA targets such as `W_pack` mean what users of the originals expect.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from baichuan import cpu_gemv
from baichuan.config import Config
from baichuan.cpu import UPCAST_MIN_ROWS, half_is_emulated
from baichuan.position import ALiBi, RoPE, build_position


class Cache(Protocol):
    """What attention needs from a cache: store new keys/values of positions start.., return all of them."""

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def emulated_half(x: torch.Tensor) -> bool:
    """A bf16/fp16 CPU tensor on a CPU that can only emulate half-precision arithmetic."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and half_is_emulated(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that multiplies many rows of a bf16/fp16 weight in fp32 where
    the CPU only emulates half precision. There torch's bf16 GEMM runs at ~10 GFLOP/s per core whatever the number
    of rows, while upcasting the weight for the fp32 GEMM makes a 512-row product ~6x faster (2-core Zen 3).
    Mat-vecs (decoding) stay in bf16: they are bound by memory, and an fp32 copy would only add traffic; on the CPU
    they go through our bf16 kernel (`cpu_gemv.bf16_linear`) where it applies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_gemv.bf16_linear(x, self.weight, self.bias)
        if y is not None:
            return y
        if x.numel() >= UPCAST_MIN_ROWS * x.shape[-1] and emulated_half(x):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return super().forward(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, then back to the weight's precision (the originals' order of casts).
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x.float() * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.W_pack = Linear(config.dim, 3 * config.dim, bias=False)  # q, k, v stacked
        self.o_proj = Linear(config.dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        pos: RoPE | ALiBi,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
        start: int,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            self.W_pack(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # (B, H, T, D)
        q, k = pos.rotate(q, k, positions)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start, k, v)  # (B, H, S, D)
        if T == 1 and emulated_half(q):
            # One query against the cache: torch's CPU flash kernel in emulated bf16 costs 2-4x this fp32
            # product (0.8 vs 0.3 ms a layer at 512 cached positions, 2-core Zen 3).
            scores = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5  # (B, H, 1, S)
            if mask is not None:
                scores = scores + mask
            y = (scores.softmax(dim=-1) @ v.float()).to(q.dtype)
        else:
            # No mask means plain causal attention over a fresh sequence, which keeps SDPA's flash path.
            causal = mask is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_proj = Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = Linear(config.ffn_dim, config.dim, bias=False)
        self.up_proj = Linear(config.dim, config.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.dim, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.rms_norm_eps)

    def forward(self, x, pos, positions, mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), pos, positions, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class BaichuanModel(nn.Module):
    """Embeddings, decoder layers and the final norm: everything but the output head."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.position = build_position(config)  # one object shared by all layers; no parameters
        self.gradient_checkpointing = False

    def forward(
        self,
        idx: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """idx (B, T) holds positions start_pos..start_pos+T-1. With a cache, keys cover 0..start_pos+T-1 and
        `attention_mask` (B, start_pos+T) marks real tokens (1) and padding (0) among them; without one, keys are
        the T new tokens and the mask is (B, T), or (B, T, T): the keys each query may see besides causality
        (training on several examples packed in a row keeps each one's attention within itself). `start_pos`
        may be a (B,) tensor: each row then continues at its own position (the rows of a continuously batched
        server). Collects the official
        `output_hidden_states` into `hidden_states` when a list is given."""
        B, T = idx.shape
        steps = torch.arange(T, device=idx.device)
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos.to(idx.device)[:, None] + steps  # (B, T)
            k_len = int(start_pos.max()) + T
        else:
            positions = start_pos + steps  # (T,)
            k_len = start_pos + T
        if cache is None and k_len != T:
            raise ValueError("start_pos > 0 needs a cache holding the earlier positions")
        mask = self.attention_bias(positions, k_len, attention_mask, self.embed_tokens.weight.dtype)

        x = self.embed_tokens(idx)
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(
                    layer, x, self.position, positions, mask, cache, start_pos, use_reentrant=False
                )
            else:
                x = layer(x, self.position, positions, mask, cache, start_pos)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

    def attention_bias(
        self, q_positions: torch.Tensor, k_len: int, attention_mask: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The additive mask for SDPA, (B|1, H|1, T, S), or None where plain causal attention is exact.
        q_positions is (T,), shared by the batch, or (B, T)."""
        T = q_positions.shape[-1]
        bias = self.position.bias(q_positions, k_len)  # (H, T, S), (B, H, T, S) or None
        if bias is None and attention_mask is None and q_positions.dim() == 1 and (T == k_len or T == 1):
            return None
        k_positions = torch.arange(k_len, device=q_positions.device)
        keep = k_positions <= q_positions[..., None]  # (T, S) or (B, T, S): causal
        if attention_mask is not None:
            if attention_mask.shape[-1] != k_len:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} positions, expected {k_len}"
                )
            # Every query keeps its own key, so padding rows stay finite (they attend to themselves only)
            # instead of turning into NaN; the originals fill them with uniform garbage instead.
            diagonal = k_positions == q_positions[..., None]
            # (B, S): the real keys; (B, T, S): the keys each query may see (examples packed in one row).
            allowed = attention_mask[:, None, :] if attention_mask.dim() == 2 else attention_mask
            keep = (keep & allowed.bool()) | diagonal  # (B, T, S)
        keep = keep.unsqueeze(-3)  # (..., 1, T, S)
        if bias is None:
            bias = torch.zeros((), device=keep.device)
        return torch.where(keep, bias, float("-inf")).to(dtype)


class NormHead(nn.Module):
    """Baichuan2's output layer: logits against L2-normalised rows of the weight. Pure: the weight is never
    modified in forward (the originals normalise it in place in eval mode); `checkpoint.fold_norm_head`
    swaps it for a plain Linear for fast inference."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=-1))


def build_head(config: Config) -> nn.Module:
    if config.norm_head:
        return NormHead(config.dim, config.vocab_size)
    return Linear(config.dim, config.vocab_size, bias=False)


class Baichuan(nn.Module):
    """The causal language model: `model` (trunk) and `lm_head`, named as in the official checkpoints."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = BaichuanModel(config)
        self.lm_head = build_head(config)

    def forward(
        self,
        idx: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        x = self.model(idx, start_pos, cache, attention_mask)
        if last_only:  # generation needs only the next-token logits
            x = x[:, -1:]
        return self.lm_head(x)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        init_weights(self, std, generator)

    @classmethod
    def from_modules(cls, config: Config, model: BaichuanModel, lm_head: nn.Module) -> Baichuan:
        """A view over existing modules (no copy), e.g. those of the transformers face."""
        view = cls.__new__(cls)
        nn.Module.__init__(view)
        view.config, view.model, view.lm_head = config, model, lm_head
        return view


def init_weights(module: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Random initialisation for training from scratch: N(0, std) for linears and embeddings, ones for norms."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, NormHead)):
                m.weight.normal_(0.0, std, generator=generator)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss_weight: float = 0.0) -> torch.Tensor:
    """Next-token cross entropy (labels -100 ignored), plus Baichuan2's max-z loss when its weight is set.

    The z term follows the original: weight · mean(max_logit²) over all shifted positions, ignored ones included.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
    )
    if z_loss_weight:
        loss = loss + z_loss_weight * shift_logits.max(dim=-1).values.pow(2).mean()
    return loss
