"""Weights on transparent huge pages (2 MiB), for CPU decoding.

A decode step streams every weight once, and with 4 KiB pages the page walks of its TLB misses take a share of
each product's time; in a virtual machine each walk also walks the host's tables. On a 2-core Sapphire Rapids
VM the same products took 7-10% (bf16), 13-20% (int8) and 4-8% (int4) less time from huge pages
(benchmarks/README.md). Linux backs anonymous memory with them where it is advised to (`MADV_HUGEPAGE`, honoured
in the kernel's "madvise" and "always" modes), so weights are placed in private anonymous mappings advised so:
read straight into them by the loader (`HugePageArena.empty`), or copied there (`HugePageArena.adopt`).

Each tensor gets a storage of its own over its slice of a mapping (safetensors, `torch.save` and DeepSpeed see no
shared storages), and the mapping lives as long as any tensor in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from baichuan.memory import return_free_memory

HUGE_PAGE = 2 * 2**20
# Smaller tensors (norms, biases, small scales) stay in torch's allocator: they are not what a step streams.
MIN_BYTES = 256 * 2**10
# The address space taken a mapping at a time; only the pages written become memory (the last huge page of a
# mapping is what a load may leave unused).
CHUNK_BYTES = 512 * 2**20
SLICE_ALIGN = 4096
# `adopt` hands freed pages back after each this many bytes moved (glibc keeps freed blocks: memory.py).
TRIM_BYTES = 128 * 2**20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages(setting: Path = THP_SETTING) -> str | None:
    """The kernel's mode ("always", "madvise" or "never"); None where there is no such setting (not Linux)."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


def huge_pages_available() -> bool:
    """Whether advised anonymous memory can get huge pages here."""
    return (
        sys.platform.startswith("linux")
        and hasattr(mmap, "MADV_HUGEPAGE")
        and transparent_huge_pages() in ("always", "madvise")
    )


class HugePageArena:
    """Hands out tensors in anonymous mappings advised for huge pages, each slice aligned to 4 KiB."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self._view: memoryview | None = None  # the current mapping, from its first 2 MiB boundary
        self._used = 0
        self._ranges: list[tuple[int, int]] = []  # (first address, end) of each mapping

    def empty(self, shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor; on huge pages where it is large enough to matter (and a mapping can be had:
        under strict overcommit a chunk's address space counts against the limit, so a refused one falls back
        to torch's allocator)."""
        shape = tuple(shape)
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if nbytes >= MIN_BYTES:
            with contextlib.suppress(OSError):
                return torch.frombuffer(self._take(nbytes), dtype=dtype).view(shape)
        return torch.empty(shape, dtype=dtype)

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` lies in one of this arena's mappings."""
        address = tensor.data_ptr()
        return tensor.device.type == "cpu" and any(start <= address < end for start, end in self._ranges)

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` copied onto huge pages (itself where it is small, not on the CPU, or there already)."""
        if tensor.device.type != "cpu" or tensor.nbytes < MIN_BYTES or self.holds(tensor):
            return tensor
        placed = self.empty(tensor.shape, tensor.dtype)
        placed.copy_(tensor)
        return placed

    def adopt(self, module: nn.Module, skip: tuple[type[nn.Module], ...] = (nn.Embedding,)) -> int:
        """Move the large CPU parameters and buffers of `module` onto huge pages in place (`.data` swapped, so
        every holder of the tensor objects sees them), except those of `skip` modules (an embedding reads a row
        a token, nothing to stream). Returns the bytes moved. Freed memory is handed back as it goes, so the
        peak stays near the model's size plus its largest tensor."""
        moved = since_trim = 0
        for sub in module.modules():
            if isinstance(sub, skip):
                continue
            for tensors in (sub._parameters, sub._buffers):
                for tensor in tensors.values():
                    if tensor is None or tensor.device.type != "cpu":
                        continue
                    if tensor.nbytes < MIN_BYTES or self.holds(tensor) or not tensor.is_contiguous():
                        continue
                    with torch.no_grad():
                        tensor.data = self.place(tensor.data)
                    moved += tensor.nbytes
                    since_trim += tensor.nbytes
                    if since_trim >= TRIM_BYTES:
                        return_free_memory()
                        since_trim = 0
        if moved:
            return_free_memory()
        return moved

    def _take(self, nbytes: int) -> memoryview:
        size = -(-nbytes // SLICE_ALIGN) * SLICE_ALIGN
        if self._view is None or self._used + size > len(self._view):
            self._view, self._used = _mapping(max(size, self.chunk_bytes)), 0
            start = _address(self._view)
            self._ranges.append((start, start + len(self._view)))
        piece = self._view[self._used : self._used + nbytes]
        self._used += size
        return piece


def _mapping(nbytes: int) -> memoryview:
    """A private anonymous mapping of at least `nbytes` from a 2 MiB boundary, advised for huge pages (the
    kernel only backs whole aligned 2 MiB ranges with them)."""
    length = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE
    region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -_address(region) % HUGE_PAGE
    with contextlib.suppress(OSError):  # a kernel without THP: ordinary pages
        region.madvise(mmap.MADV_HUGEPAGE, start, length - start)
    return memoryview(region)[start : start + nbytes]


def _address(buffer: mmap.mmap | memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def empty(shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty` on the CPU: on huge pages where the tensor is large and the system offers them."""
    if huge_pages_available():
        return HugePageArena(chunk_bytes=0).empty(shape, dtype)
    return torch.empty(tuple(shape), dtype=dtype)


def clone(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor`: on huge pages where it is a large CPU tensor and the system offers them."""
    if tensor.device.type != "cpu":
        return tensor.clone()
    return empty(tensor.shape, tensor.dtype).copy_(tensor)


def move_to_huge_pages(module: nn.Module) -> int:
    """`HugePageArena.adopt` where the system offers huge pages (else nothing moves); the bytes moved."""
    return HugePageArena().adopt(module) if huge_pages_available() else 0
