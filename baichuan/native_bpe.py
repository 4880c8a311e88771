"""Exact SentencePiece BPE encoding in C++ (`csrc/bpe.cpp`), compiled on first use and cached.

`Encoder(model_proto)` gives the ids of `SentencePieceProcessor.encode` for the same serialized model, and the
character offsets of each piece, several times faster, with a batch call that runs without the GIL on several
threads. `tests/test_native_bpe.py` and `benchmarks/bench_tokenizer.py` check it against sentencepiece.

Built as a plain CPython extension with the system's C++ compiler, not through torch's `cpp_extension`: the
tokenizer is layer 1 and must not import torch (seconds at start, for a data-preparation worker or the server),
the build needs no pybind11 (seconds, not a minute), and a direct C function returns a list of ints with less per
call than ctypes would (which matters on one short text at a time). The build goes to
`$XDG_CACHE_HOME/baichuan/native/` (default `~/.cache`), in a directory named by a hash of the source, the
compiler flags and the Python ABI, so an edited source or another Python builds anew and never loads a stale
library. Where no compiler or no Python headers are found, or the build fails, `load()` gives None (one warning
says why) and the tokenizers keep sentencepiece.

Layer 0: the standard library only.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).parent / "csrc" / "bpe.cpp"
MODULE = "baichuan_bpe"
# Portable code (no -march=native): a cache shared between machines of one architecture stays valid.
FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden"]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "baichuan" / "native"


def build_dir(compiler: str = "") -> Path:
    """Where the build of this source for this Python lives."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode()):
        key.update(part)
        key.update(b"\0")
    key.update(f"{sysconfig.get_config_var('EXT_SUFFIX')} {platform.machine()} {sys.version}".encode())
    return cache_root() / f"bpe-{key.hexdigest()[:16]}"


@functools.cache
def load() -> ModuleType | None:
    """The compiled module, built here if needed; None where it cannot be (the reason goes to a warning, once)."""
    try:
        return _load()
    except (
        Exception
    ) as e:  # no compiler, no headers, a build error, an unwritable cache: sentencepiece still works
        warnings.warn(
            f"the native tokenizer could not be built ({type(e).__name__}: {str(e).strip()[:300]}); "
            "encoding with sentencepiece instead",
            stacklevel=2,
        )
        return None


def _load() -> ModuleType:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (c++, g++ or clang++) on PATH")
    directory = build_dir(compiler)
    library = directory / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    if not library.is_file():
        include = sysconfig.get_paths()["include"]
        if not (Path(include) / "Python.h").is_file():
            raise FileNotFoundError(f"no Python headers at {include} (install python3-dev)")
        directory.mkdir(parents=True, exist_ok=True)
        print("baichuan: building the native tokenizer (once per machine, a few seconds)...", file=sys.stderr)
        # Built under a temporary name and renamed: processes building at once never load a half-written file.
        fd, partial = tempfile.mkstemp(dir=directory, suffix=".so")
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", partial],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-1000:]}")
            os.replace(partial, library)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    spec = importlib.util.spec_from_file_location(MODULE, library)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Encoder:
    """`SentencePieceProcessor.encode` of one BPE model (its serialized ModelProto), natively. Raises ValueError
    for a model it does not encode (not BPE, or broken); `create` gives None then, and where nothing is built."""

    def __init__(self, module: ModuleType, model_proto: bytes):
        self.model_proto = model_proto  # what it pickles as (a tokenizer goes to worker processes)
        self.model = module.load(model_proto)
        # Bound to the model once: `encode` is then one C call.
        self.encode = functools.partial(module.encode, self.model)
        self._offsets = functools.partial(module.encode_offsets, self.model)
        self._batch = functools.partial(module.encode_batch, self.model)
        self.splits_words: bool = module.splits_words(self.model)

    @classmethod
    def create(cls, model_proto: bytes) -> Encoder | None:
        module = load()
        if module is None:
            return None
        try:
            return cls(module, model_proto)
        except ValueError:  # a unigram model, say: sentencepiece encodes it
            return None

    def __reduce__(self):
        # The compiled model cannot be pickled; its model file can, and is encoded again on the other side (by
        # sentencepiece there, where no encoder can be built: see `_rebuilt`).
        return _rebuilt, (self.model_proto,)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, for each, the (begin, end) characters of `text` it covers, as sentencepiece's pieces give
        them: the dummy-prefix `▁` adds nothing to a span, a control piece covers nothing, and of the byte pieces
        of one character all but the last cover nothing."""
        return self._offsets(text)

    def encode_batch(self, texts: Sequence[str], threads: int | None = None) -> list[list[int]]:
        """`encode` of each text, shared among `threads` threads (default: the CPUs this process may use)."""
        if threads is None:
            threads = available_cpus()
        return self._batch(texts, max(1, int(threads)))


def _rebuilt(model_proto: bytes) -> Encoder | None:
    return Encoder.create(model_proto)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
