"""Pretraining data: text files tokenised into one memory-mapped token file, read as packed windows.

`prepare_data` reads UTF-8 text files (one document per line, the original Baichuan-7B loader's unit), JSONL
(one document per line, its text under a field) and JSON (an array of records, or one record: every string in
a record joined by newlines, e.g. the chinese-poetry files). It tokenises in worker processes and writes
`train.bin` (and `val.bin` when every N-th document is held out): the token ids of each document followed by
EOS, as np.uint16 where the vocabulary fits, else np.uint32, plus `meta.json`. Bad lines are skipped and
reported by file and line: invalid UTF-8, empty, over a size limit, or (JSONL) not an object with a string
text field; every one is listed in `skipped.tsv`.

`PackedBatches` cuts the token file into fixed-length windows and deals them out in an order that depends only
on the seed and the epoch: global sample g of the run is window perm_epoch[g % n_windows]. A step takes the
next `global_batch` samples; rank r of `world_size` gets its own contiguous slice of them. So the data of a
step, and the whole run, is the same for 1 process or 8 with the same global batch, and the position in the
data is the step number alone (what a resumed run needs).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
CHUNK_BYTES = 1 << 20  # lines sent to a worker at a time


@dataclass
class Skipped:
    file: str
    line: int  # 1-based; 0 for the whole file
    reason: str


@dataclass
class PrepareReport:
    files: int = 0
    documents: int = 0
    tokens: int = 0
    val_tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: list[Skipped] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.skipped:
            key = s.reason.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        return counts


def input_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The files to read: each given file, and every text/JSONL/JSON file under each given directory, sorted
    (the order of the token file, hence of the documents, is fixed by the paths alone)."""
    files: list[Path] = []
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    if not files:
        raise FileNotFoundError(f"no text, JSONL or JSON files in {', '.join(map(str, inputs))}")
    return files


def json_strings(node: object, key: str | None = None) -> Iterator[str]:
    """Every string of a JSON record, in order, but those under an "id" key (uuids are not text)."""
    if isinstance(node, str):
        if key != "id":
            yield node
    elif isinstance(node, list):
        for item in node:
            yield from json_strings(item, key)
    elif isinstance(node, dict):
        for k, value in node.items():
            yield from json_strings(value, k)


def _documents(
    name: str, kind: str, first_line: int, lines: list[bytes], text_field: str, max_line_bytes: int
) -> tuple[list[str], list[Skipped]]:
    """Decode and check one chunk of lines (or a whole JSON file as one 'line')."""
    docs, skipped = [], []
    for number, raw in enumerate(lines, start=first_line):
        raw = raw.rstrip(b"\r")
        if number == 1 or kind == "json":
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is not text
        if kind != "json" and len(raw) > max_line_bytes:
            skipped.append(
                Skipped(name, number, f"over the size limit: {len(raw):,} > {max_line_bytes:,} bytes")
            )
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skipped.append(
                Skipped(name, number, f"invalid UTF-8: byte {raw[e.start]:#04x} at offset {e.start}")
            )
            continue
        if kind == "text":
            if not text.strip():
                skipped.append(Skipped(name, number, "empty"))
                continue
            docs.append(text)
            continue
        if not text.strip():
            skipped.append(Skipped(name, number, "empty"))
            continue
        try:
            value = json.loads(text)
        except ValueError as e:
            skipped.append(Skipped(name, number, f"invalid JSON: {e}"))
            continue
        if kind == "jsonl":
            if not isinstance(value, dict) or not isinstance(value.get(text_field), str):
                skipped.append(Skipped(name, number, f"no string field {text_field!r}"))
            elif not value[text_field].strip():
                skipped.append(Skipped(name, number, "empty"))
            else:
                docs.append(value[text_field])
            continue
        for record in value if isinstance(value, list) else [value]:
            text = "\n".join(s for s in json_strings(record) if s.strip())
            if text:
                docs.append(text)
    return docs, skipped


def iter_documents(
    inputs: Sequence[str | os.PathLike], text_field: str = "text", max_line_bytes: int = 1 << 20
) -> Iterator[str]:
    """The documents prepare_data would tokenise, in its order, read in this process (bad lines skipped)."""
    files = input_files(inputs)
    for task in _tasks(files, [str(p) for p in files], text_field, max_line_bytes):
        yield from _documents(*task)[0]


_worker_encoder: Callable[[list[str]], list[list[int]]] | None = None


def _init_worker(tokenizer: str) -> None:
    global _worker_encoder  # one tokenizer per worker process, loaded once
    from baichuan.tokenizer import load_sentencepiece

    sp = load_sentencepiece(tokenizer)
    _worker_encoder = sp.encode


def _tokenize_chunk(task: tuple) -> tuple[list[list[int]], list[Skipped], int]:
    name, kind, first_line, lines, text_field, max_line_bytes = task
    docs, skipped = _documents(name, kind, first_line, lines, text_field, max_line_bytes)
    assert _worker_encoder is not None
    return _worker_encoder(docs) if docs else [], skipped, sum(len(x) + 1 for x in lines)


def _tasks(files: list[Path], root_names: list[str], text_field: str, max_line_bytes: int) -> Iterator[tuple]:
    for path, name in zip(files, root_names, strict=True):
        suffix = path.suffix.lower()
        kind = "jsonl" if suffix in JSONL_SUFFIXES else "json" if suffix in JSON_SUFFIXES else "text"
        data = path.read_bytes()
        if kind == "json":
            yield name, kind, 0, [data], text_field, max_line_bytes
            continue
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the newline that ends the last line starts no line
        chunk, size, first = [], 0, 1
        for i, line in enumerate(lines):
            chunk.append(line)
            size += len(line)
            if size >= CHUNK_BYTES:
                yield name, kind, first, chunk, text_field, max_line_bytes
                chunk, size, first = [], 0, i + 2
        if chunk:
            yield name, kind, first, chunk, text_field, max_line_bytes


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare_data(
    inputs: Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike,
    out: str | os.PathLike,
    workers: int | None = None,
    text_field: str = "text",
    max_line_bytes: int = 1 << 20,
    val_every: int = 0,
    progress: Callable[[int, int, int], None] | None = None,
) -> PrepareReport:
    """Tokenise `inputs` into `out`/train.bin (+ val.bin: every `val_every`-th document) and meta.json.
    `progress(bytes_done, bytes_total, tokens)` hears of each chunk. The files are written under temporary
    names and renamed into place at the end, so an interrupted run leaves no half token file."""
    from baichuan.tokenizer import load_sentencepiece

    tokenizer = Path(tokenizer)
    sp = load_sentencepiece(tokenizer)
    vocab_size, eos_id = sp.vocab_size(), sp.eos_id()
    if eos_id < 0:
        raise ValueError(f"{tokenizer}: the tokenizer has no EOS piece to put between documents")
    dtype = token_dtype(vocab_size)
    files = input_files(inputs)
    common = Path(os.path.commonpath([p.resolve().parent for p in files]))
    names = [str(p.resolve().relative_to(common)) for p in files]
    total_bytes = sum(p.stat().st_size for p in files)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_file = tokenizer / "tokenizer.model" if tokenizer.is_dir() else tokenizer
    workers = workers if workers is not None else (os.cpu_count() or 1)
    report = PrepareReport(files=len(files))
    start = time.perf_counter()
    tasks = _tasks(files, names, text_field, max_line_bytes)
    eos = np.array([eos_id], dtype=dtype)
    tmp_train, tmp_val = out / ".train.bin.tmp", out / ".val.bin.tmp"
    with open(tmp_train, "wb") as train_f, open(tmp_val, "wb") as val_f:
        if workers <= 1:
            _init_worker(str(model_file))
            results = map(_tokenize_chunk, tasks)
            pool = None
        else:
            pool = multiprocessing.get_context().Pool(workers, _init_worker, (str(model_file),))
            results = pool.imap(_tokenize_chunk, tasks)  # ordered: the token file's order is the files'
        try:
            for encoded, skipped, nbytes in results:
                report.skipped += skipped
                report.bytes += nbytes
                for ids in encoded:
                    report.documents += 1
                    held_out = val_every > 0 and report.documents % val_every == 0
                    target = val_f if held_out else train_f
                    array = np.asarray(ids, dtype=dtype)
                    target.write(array.tobytes())
                    target.write(eos.tobytes())
                    if held_out:
                        report.val_tokens += len(ids) + 1
                    else:
                        report.tokens += len(ids) + 1
                if progress is not None:
                    progress(min(report.bytes, total_bytes), total_bytes, report.tokens + report.val_tokens)
        finally:
            if pool is not None:
                pool.terminate()
        for f in (train_f, val_f):
            f.flush()
            os.fsync(f.fileno())
    report.seconds = time.perf_counter() - start
    os.replace(tmp_train, out / "train.bin")
    if report.val_tokens:
        os.replace(tmp_val, out / "val.bin")
    else:
        tmp_val.unlink()
        (out / "val.bin").unlink(missing_ok=True)
    with open(out / "skipped.tsv", "w", encoding="utf-8") as f:
        f.write("file\tline\treason\n")
        for s in report.skipped:
            f.write(f"{s.file}\t{s.line}\t{s.reason}\n")
    meta = {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokens": report.tokens,
        "val_tokens": report.val_tokens,
        "documents": report.documents,
        "val_every": val_every,
        "files": names,
        "root": str(common),
        "tokenizer": str(tokenizer.resolve()),
        "skipped": report.skipped_by_reason(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


@dataclass
class TokenFile:
    """The token file of a prepare-data directory, memory-mapped (no copy in memory)."""

    tokens: np.ndarray
    vocab_size: int
    eos_id: int

    @classmethod
    def open(cls, directory: str | os.PathLike, split: str = "train") -> TokenFile:
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory}: no meta.json (run `baichuan prepare-data` first)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        path = directory / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {split}.bin")
        tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        return cls(tokens, int(meta["vocab_size"]), int(meta["eos_id"]))


class PackedBatches:
    """Fixed-length windows of a token stream for one rank, in a seeded order independent of the rank count
    (see the module docstring). `micro_batches(step)` is this rank's part of global step `step`."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        micro_batch: int,
        grad_accum: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.world_size, self.rank = world_size, rank
        self.n_windows = len(tokens) // seq_len
        if self.n_windows == 0:
            raise ValueError(f"{len(tokens):,} tokens are fewer than one sequence of {seq_len}")
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def window(self, sample: int) -> int:
        """The window index of global sample `sample`: a fresh permutation each epoch."""
        epoch, i = divmod(sample, self.n_windows)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(self.n_windows))
        return int(self._perm[1][i])

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        first = step * self.global_batch + self.rank * self.micro_batch * self.grad_accum
        batches = []
        for m in range(self.grad_accum):
            rows = []
            for j in range(self.micro_batch):
                w = self.window(first + m * self.micro_batch + j)
                rows.append(
                    np.asarray(self.tokens[w * self.seq_len : (w + 1) * self.seq_len], dtype=np.int64)
                )
            batches.append(torch.from_numpy(np.stack(rows)))  # (B, T)
        return batches

    def state_dict(self) -> dict:
        """What must match for a resumed run to see the same data (the position is the step)."""
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "global_batch": self.global_batch,
        }
