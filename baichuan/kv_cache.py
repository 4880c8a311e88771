"""A preallocated key/value cache, passed to the model rather than stored on it."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """(layers, B, H, S_max, D) key and value buffers.

    The model calls `update(layer, start, k, v)` with the new keys/values of positions start..start+T-1 and gets
    back everything cached for positions 0..start+T-1. Writing at an earlier `start` overwrites from there, which
    is how a chat re-uses the cache of a shared prefix. Keys are stored after RoPE, as in the originals.

    The cache has a dtype of its own: at long contexts it outweighs the weights it serves (Baichuan2-7B, 4,096
    positions: 2 GiB a row in 16 bits), so an fp32 model may keep it in bf16. Keys/values are rounded to it
    when written and come back in the dtype they were given, so attention always computes in the model's
    dtype; a cache in the model's dtype is exact.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        shape = (n_layers, batch_size, n_heads, max_seq_len, head_dim)
        # Zeros, not torch.empty: a batch reads positions a shorter row never wrote, masked to a weight of 0,
        # and 0 x (garbage that happens to be NaN) would still be NaN. Zeroing also commits the memory now,
        # so a cache that does not fit fails here rather than in the middle of an answer.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @classmethod
    def for_model(cls, config, batch_size: int, max_seq_len: int, dtype: torch.dtype, device=None) -> KVCache:
        return cls(config.n_layers, batch_size, config.n_heads, max_seq_len, config.head_dim, dtype, device)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(
        self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, H, T, D) for positions start..start+T-1; `start` is an int or a (B,) tensor of per-row
        positions. Returns the cached (B, H, end, D) up to the furthest row's end, in k's and v's dtype."""
        T = k.shape[2]
        new_k, new_v = k.to(self.k.dtype), v.to(self.v.dtype)
        if isinstance(start, torch.Tensor):
            slots = start.to(self.k.device)[:, None] + torch.arange(T, device=self.k.device)  # (B, T)
            end = int(slots.max()) + 1
            self._check(end)
            rows = torch.arange(k.shape[0], device=self.k.device)[:, None]
            self.k[layer, rows, :, slots] = new_k.transpose(1, 2)  # indexed as (B, T, H, D)
            self.v[layer, rows, :, slots] = new_v.transpose(1, 2)
        else:
            end = start + T
            self._check(end)
            self.k[layer, :, :, start:end] = new_k
            self.v[layer, :, :, start:end] = new_v
        return self.k[layer, :, :, :end].to(k.dtype), self.v[layer, :, :, :end].to(v.dtype)

    def _check(self, end: int) -> None:
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; asked to write up to {end}")

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (sequences that finished leave the batch)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
