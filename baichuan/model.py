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
from baichuan.kv_cache import KVCache
from baichuan.position import ALiBi, RoPE, build_position
from baichuan.quant.int4 import Int4Linear
from baichuan.quant.int8 import Int8Linear


class Cache(Protocol):
    """What attention needs from a cache: store new keys/values of positions start.., return all of them."""

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def emulated_half(x: torch.Tensor) -> bool:
    """A bf16/fp16 CPU tensor on a CPU that can only emulate half-precision arithmetic."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and half_is_emulated(x.dtype)


def fused_kernel(name: str):
    """One of our fused CPU kernels (`csrc/cpu_fused.cpp`, built with `cpu_gemv`), or None where they are not
    available here."""
    module = cpu_gemv.load()
    return None if module is None else getattr(module, name, None)


def _fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a fused kernel may take x: no autograd to record, fp32/bf16 on the CPU, weight in x's dtype."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype is weight.dtype
        and (x.dtype is torch.float32 or x.dtype is torch.bfloat16)
    )


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that multiplies many rows of a bf16/fp16 weight in fp32 where
    the CPU only emulates half precision. There torch's bf16 GEMM runs at ~10 GFLOP/s per core whatever the number
    of rows, while upcasting the weight for the fp32 GEMM makes a 512-row product ~6x faster (2-core Zen 3), and
    our prompt kernel (`cpu_gemv.bf16_matmul`, the avx2 build) 1.1-1.5x faster again at 512 rows, without the fp32
    copy.
    Mat-vecs (decoding) stay in bf16: they are bound by memory, and an fp32 copy would only add traffic; on the CPU
    they go through our bf16 kernel (`cpu_gemv.bf16_linear`) where it applies. A bf16 weight may also serve fp32
    activations (the float head of a quantized fp32 model, or every linear layer of a model loaded with
    `bf16_weights`, `checkpoint.load_into`): the output is then fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_gemv.bf16_linear(x, self.weight, self.bias)
        if y is not None:
            return y
        # Under autocast torch's product casts both itself: an fp32 copy of the weight would be cast straight back.
        if (
            x.dtype is torch.float32
            and self.weight.dtype is not torch.float32
            and not cpu_gemv.autocast_enabled(x.device.type)
        ):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x, self.weight.float(), bias)
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
        if _fusable(x, self.weight):
            rms_norm = fused_kernel("rms_norm")
            if rms_norm is not None:  # one op, the same casts
                return rms_norm(x.contiguous(), self.weight.contiguous(), self.eps)
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
        # No mask means plain causal attention over a fresh sequence: our AMX kernel where it applies (its
        # output already (B, T, C)), else SDPA's flash path.
        causal = mask is None and T > 1
        if causal and k.shape[2] == T:
            y = cpu_gemv.causal_attention(q, k, v)
            if y is not None:
                return self.o_proj(y)
        if T == 1 and emulated_half(q):
            # One query against the cache: torch's CPU flash kernel in emulated bf16 costs 2-4x this fp32
            # product (0.8 vs 0.3 ms a layer at 512 cached positions, 2-core Zen 3).
            scores = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5  # (B, H, 1, S)
            if mask is not None:
                scores = scores + mask
            y = (scores.softmax(dim=-1) @ v.float()).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_proj = Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = Linear(config.ffn_dim, config.dim, bias=False)
        self.up_proj = Linear(config.dim, config.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        silu_mul = fused_kernel("silu_mul") if _fusable(gate, up) else None
        if silu_mul is not None:
            return self.down_proj(silu_mul(gate.contiguous(), up.contiguous()))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.dim, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.rms_norm_eps)

    def forward(self, x, pos, positions, mask, cache, start):
        attended = self.self_attn(self.input_layernorm(x), pos, positions, mask, cache, start)
        x, h = _add_and_norm(x, attended, self.post_attention_layernorm)
        return _add(x, self.mlp(h))


def _add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y: our kernel where it applies (bf16 at 512 x 1536: torch 0.092 ms, ours 0.058, AMX Xeon)."""
    add = fused_kernel("add") if _fusable(x, y) and x.shape == y.shape else None
    return x + y if add is None else add(x.contiguous(), y.contiguous())


def _add_and_norm(x: torch.Tensor, y: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, norm(x + y)) in one pass over the rows where our kernel and the module's own forward agree."""
    fused = None
    if _plain(norm) and _fusable(x, norm.weight) and x.shape == y.shape and y.dtype is x.dtype:
        fused = fused_kernel("add_rms_norm")
    if fused is None:
        x = x + y
        return x, norm(x)
    return tuple(fused(x.contiguous(), y.contiguous(), norm.weight.contiguous(), norm.eps))


# How `decode_layer` (csrc/cpu_fused.cpp) runs each product of a layer: the choice the layer's own forward makes.
_TORCH_PRODUCT = 0
_BF16_PRODUCT = 1
_INT8_PRODUCT = 2
_INT4_PRODUCT = 3
_AMX_INT8_PRODUCT = 4
_AMX_BF16_PRODUCT = 5


def _plain(module: nn.Module) -> bool:
    """No hooks and no forward replaced on the instance (a profiler's timer, say): skipping its forward is safe."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or "forward" in module.__dict__
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    )


def _fused_product(module: nn.Module, rows: int, dtype: torch.dtype) -> tuple | None:
    """(kind, tensor, tensor, group size) for `decode_layer`: how `module.forward` would multiply `rows` decode
    rows of `dtype`; None where that is something else (LoRA, a bias, torch's int kernels, ...)."""
    kind = type(module)
    if not _plain(module):
        return None
    buffers = module._buffers
    if kind is Linear:
        weight = module._parameters["weight"]
        if module._parameters["bias"] is not None:
            return None
        if weight.dtype is not dtype:
            # A bf16 weight beside fp32 activations (checkpoint.load_into's bf16_weights): the mat-vec that widens
            # each weight, as the module's forward would take it; more rows are the forward's to route.
            widened = (
                dtype is torch.float32 and weight.dtype is torch.bfloat16 and cpu_gemv.widens_fp32_rows()
            )
            if widened and rows <= cpu_gemv._bf16_max_rows() and weight.is_contiguous():
                return _BF16_PRODUCT, weight, weight, 0
            return None
        if dtype is torch.bfloat16:
            if cpu_gemv.amx_prompts(rows, weight):  # (the second tensor of both kinds is unused)
                return (_AMX_BF16_PRODUCT, weight, weight, 0) if weight.is_contiguous() else None
            if rows <= cpu_gemv._bf16_max_rows() and weight.is_contiguous():
                return _BF16_PRODUCT, weight, weight, 0
            # The module's forward: our AVX2 prompt kernel, or the fp32 GEMM on a widened copy.
            if cpu_gemv.bf16_prompts(rows, weight) or (rows >= UPCAST_MIN_ROWS and half_is_emulated(dtype)):
                return None
        return _TORCH_PRODUCT, weight, weight, 0
    if kind is Int8Linear:
        if (
            not module.use_kernel
            or module.bias is not None
            or module.group_size is not None
            or module.in_features % 16
            or rows > cpu_gemv.MAX_ROWS
        ):
            return None
        weight, scales = buffers["weight"], buffers["scales"]
        scales = scales if scales.dtype is torch.float32 else scales.float()
        if cpu_gemv.amx_int8_products(rows, *weight.shape):
            return _AMX_INT8_PRODUCT, weight, scales, 0
        if dtype is torch.bfloat16 and cpu_gemv.amx_quantized_prompts(rows, *weight.shape):
            return None
        return _INT8_PRODUCT, weight, scales, 0
    if kind is Int4Linear:
        if (
            not module.use_kernel
            or module.bias is not None
            or module.tiled is not None
            or module.cuda_tiles is not None
            or not module._gemv_fits()
            or (rows > cpu_gemv.MAX_ROWS and not half_is_emulated(torch.bfloat16))
            or (
                dtype is torch.bfloat16
                and cpu_gemv.amx_quantized_prompts(rows, module.out_features, module.in_features)
            )
        ):
            return None
        return _INT4_PRODUCT, buffers["weight"], buffers["scales_and_zeros"], module.group_size
    return None


def _fused_layer(layer: nn.Module, rows: int, dtype: torch.dtype) -> tuple | None:
    """The arguments of `decode_layer` for one layer (norm weights, eps, products), or None where it does not
    compute what the layer's forward would."""
    modules = layer._modules
    attn, mlp = modules["self_attn"], modules["mlp"]
    norm1, norm2 = modules["input_layernorm"], modules["post_attention_layernorm"]
    if not (
        type(layer) is DecoderLayer
        and type(attn) is Attention
        and type(mlp) is MLP
        and type(norm1) is RMSNorm
        and type(norm2) is RMSNorm
        and norm1.eps == norm2.eps
        and all(map(_plain, (layer, attn, mlp, norm1, norm2)))
    ):
        return None
    w1, w2 = norm1._parameters["weight"], norm2._parameters["weight"]
    if w1.dtype is not dtype or w2.dtype is not dtype or not (w1.is_contiguous() and w2.is_contiguous()):
        return None
    products = []
    for module in (attn.W_pack, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        product = _fused_product(module, rows, dtype)
        if product is None:
            return None
        products.append(product)
    weights = [t for product in products for t in product[1:3]]
    kinds = [product[0] for product in products]
    groups = [product[3] for product in products]
    return w1, w2, norm1.eps, weights, kinds, groups


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
        # Decode steps (one token a row, a KVCache, no autograd) run each layer as one call of our fused CPU
        # kernel where it computes what the modules would; False keeps the modules' own forwards.
        self.fused_decode = True

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
        if (
            T == 1
            and self.fused_decode
            and attention_mask is None
            and hidden_states is None
            and isinstance(cache, KVCache)
            and not torch.is_grad_enabled()
        ):
            x = self._fused_decode(idx, start_pos, cache)
            if x is not None:
                return x
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

    def _fused_decode(
        self, idx: torch.Tensor, start_pos: int | torch.Tensor, cache: KVCache
    ) -> torch.Tensor | None:
        """A decode step (idx (B, 1)) through `decode_layer`, one call a layer; None where it does not apply
        (ALiBi, a dtype or product it does not take, hooks), and the caller runs the modules."""
        decode_layer = fused_kernel("decode_layer") if idx.device.type == "cpu" else None
        if decode_layer is None or type(self.position) is not RoPE or not _plain(self.embed_tokens):
            return None
        B = idx.shape[0]
        dtype = self.embed_tokens.weight.dtype
        k, v = cache.k, cache.v
        if not (
            (dtype is torch.float32 or dtype is torch.bfloat16)
            and (k.dtype is dtype or (dtype is torch.float32 and k.dtype is torch.bfloat16))
            and v.dtype is k.dtype
            and k.shape[1] == B
            and k.device.type == "cpu"
        ):
            return None
        layers = [_fused_layer(layer, B, dtype) for layer in self.layers]
        if any(layer is None for layer in layers):
            return None
        positions = [start_pos] * B if isinstance(start_pos, int) else start_pos.tolist()
        end = max(positions) + 1
        cache._check(end)
        cos, sin = self.position._cos_sin(end, idx.device)
        x = self.embed_tokens(idx)  # (B, 1, C)
        n_heads = self.config.n_heads
        for i, (norm1, norm2, eps, weights, kinds, groups) in enumerate(layers):
            x = decode_layer(
                x, norm1, norm2, eps, weights, kinds, groups, k[i], v[i], positions, cos, sin, n_heads
            )
        return self.norm(x)

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
