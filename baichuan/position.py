"""Position encodings behind one interface: RoPE (Baichuan-7B, Baichuan2-7B) and ALiBi (the 13B models).

`rotate(q, k, positions)` turns queries and keys; `bias(q_positions, k_len)` is an additive attention bias or None.
Both compute their tables lazily per device, in float32, and hold no parameters or state-dict buffers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from baichuan import cpu_gemv
from baichuan.config import ALIBI, Config


class RoPE(nn.Module):
    """Rotary embedding, rotate-half convention, so the official W_pack loads without permutation."""

    def __init__(self, head_dim: int, base: float = 10_000.0, max_seq_len: int = 4096):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.max_seq_len = max_seq_len
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), each (S, D) in fp32

    def _cos_sin(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._table
        if table is None or table[0].shape[0] < length or table[0].device != device:
            # Grow past max_seq_len when asked, as the originals do, rather than fail on long inputs.
            size = max(length, self.max_seq_len)
            inv_freq = 1.0 / (
                self.base
                ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
            )
            t = torch.arange(size, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            table = (emb.cos(), emb.sin())
            self._table = table
        return table

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q, k: (B, H, T, D); positions: (T,) shared by the batch, or (B, T)
        cos, sin = self._cos_sin(int(positions.max()) + 1, q.device)
        rope = _fused_rope(q, k, positions)
        if rope is not None:  # one pass over each, the same arithmetic
            return rope(q, positions, cos, sin), rope(k, positions, cos, sin)
        cos, sin = cos[positions], sin[positions]
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]
        # Rotate in fp32 (as Baichuan2-7B does) so half-precision models keep exact positions.
        q_out = _apply_rotary(q.float(), cos, sin).to(q.dtype)
        k_out = _apply_rotary(k.float(), cos, sin).to(k.dtype)
        return q_out, k_out

    def bias(self, q_positions: torch.Tensor, k_len: int) -> None:
        return None


def _fused_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
    """Our CPU kernel (`csrc/cpu_fused.cpp`'s `rope`) where it computes what `_apply_rotary` would: fp32/bf16 on
    the CPU, rows contiguous, no autograd to record; else None."""
    if (
        q.device.type != "cpu"
        or q.dtype not in (torch.float32, torch.bfloat16)
        or k.dtype is not q.dtype
        or q.stride(-1) != 1
        or k.stride(-1) != 1
        or positions.dtype is not torch.int64
        or not positions.is_contiguous()
        or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
    ):
        return None
    module = cpu_gemv.load()
    return None if module is None else getattr(module, "rope", None)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_heads: int) -> list[float]:
    """Press et al.'s slopes; for a head count that is not a power of two (the real 13B has 40), the extra heads
    take every other slope of the next power of two. The order is the original's and is not monotonic."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


class ALiBi(nn.Module):
    """Linear attention bias. The original eval mask adds slope·j (absolute key index) in the model dtype, which
    loses up to 2.0 of precision in bf16 at 1k positions; we add the relative slope·(j − i) in fp32, which gives
    the same softmax (a constant per row cancels) without that error."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self._slopes: torch.Tensor | None = None

    def slopes(self, device: torch.device) -> torch.Tensor:
        if self._slopes is None or self._slopes.device != device:
            self._slopes = torch.tensor(alibi_slopes(self.n_heads), dtype=torch.float32, device=device)
        return self._slopes

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def bias(self, q_positions: torch.Tensor, k_len: int) -> torch.Tensor:
        # (H, T, S), or (B, H, T, S) for per-row positions: -slope_h * (i - j). Future keys (j > i) get a
        # positive bias here and are masked by the caller.
        k_positions = torch.arange(k_len, device=q_positions.device)
        distance = (k_positions - q_positions[..., None]).float().unsqueeze(-3)  # (..., 1, T, S)
        return self.slopes(q_positions.device)[:, None, None] * distance


def build_position(config: Config) -> RoPE | ALiBi:
    if config.position == ALIBI:
        return ALiBi(config.n_heads)
    return RoPE(config.head_dim, config.rope_base, config.max_seq_len)
