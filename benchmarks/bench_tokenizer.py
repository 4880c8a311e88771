"""Tokenizer speed and exactness on ../shared/data/pretrain_corpus (issue 17): ours fast and slow, sentencepiece,
llama.cpp.

    python benchmarks/bench_tokenizer.py                # ratio table, then whole-corpus agreement
    python benchmarks/bench_tokenizer.py --sample 10    # time every 10th text (the check stays whole)
    python benchmarks/bench_tokenizer.py --check        # agreement only
    python benchmarks/bench_tokenizer.py --init         # the small tokenizer `baichuan init` writes

Texts are the corpus lines (line ends kept) and the strings of its JSON files, as tests/hf/test_tokenizer.py
reads them. Every row encodes one text at a time without BOS/EOS, except the batch rows, which call the
tokenizer on lists of 1,000 texts in a child process with RAYON_NUM_THREADS (and TOKENIZERS_PARALLELISM=true)
set to 1 or 2. `AutoTokenizer` loads a directory holding the model file and a tokenizer_config.json, so it is
`BaichuanTokenizerFast`; `encode` is `tokenizer.encode(text, add_special_tokens=False)` and `call` is
`tokenizer(text, add_special_tokens=False)["input_ids"]`. Both run on our C++ encoder (`baichuan.native_bpe`)
where it builds; the "tokenizers backend" rows are the same class with native=False (the path before issue 17),
and "native" is `baichuan.tokenizer.Tokenizer.encode` (the core tokenizer, the C++ encoder behind one Python
call). llama.cpp is `llama-cpp-python`'s `Llama(vocab_only=True).tokenize` on the vocabulary GGUF, where the
package imports (its ids are those of tokenizer-llamacpp.model, so it is timed, not checked, against
tokenizer.model). The batch rows time, with 1 and 2 threads: `AutoTokenizer(list)`, the native
`Tokenizer.encode_batch(list, threads)`, the tokenizers backend on the list, and sentencepiece's own
`encode(list, num_threads)`; each against sentencepiece one text at a time in the same run.

Time is wall-clock. On a shared machine the load changes during a run, so the rows take turns on each block of
200 texts and every row's time is the sum over the blocks: the ratios compare the same moments. The load
average is printed with the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "data"
MODEL = SHARED / "baichuan-7b-tokenizer" / "tokenizer.model"
GGUF = SHARED / "baichuan-7b-tokenizer" / "ggml-vocab-baichuan.gguf"
CORPUS = SHARED / "pretrain_corpus"
BLOCK, BATCH = 200, 1000

sys.path.insert(0, str(ROOT))


def corpus_texts(corpus: Path = CORPUS) -> Iterator[str]:
    for path in sorted(corpus.rglob("*")):
        if path.suffix == ".json":
            texts = _strings(json.loads(path.read_text(encoding="utf-8")))
        elif path.suffix == ".txt":
            texts = path.read_bytes().decode("utf-8").splitlines(keepends=True)
        else:
            continue
        yield from (text for text in texts if text)


def _strings(node) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict | list):
        for child in node.values() if isinstance(node, dict) else node:
            yield from _strings(child)


def tokenizer_directory(model: Path, directory: Path) -> Path:
    (directory / "tokenizer.model").write_bytes(model.read_bytes())
    config = {"tokenizer_class": "BaichuanTokenizer", "add_bos_token": False, "add_eos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def load(directory: Path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    import baichuan.hf  # noqa: F401  (registers the classes)
    from baichuan.hf.tokenizer import BaichuanTokenizer

    fast = AutoTokenizer.from_pretrained(directory)
    slow = BaichuanTokenizer.from_pretrained(directory)
    return fast, slow, spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))


def load_native(directory: Path):
    """The core tokenizer (the C++ encoder, or sentencepiece where it cannot be built) and the fast tokenizer
    on its `tokenizers` backend (native=False)."""
    from baichuan.hf.tokenizer import BaichuanTokenizerFast
    from baichuan.tokenizer import Tokenizer

    core = Tokenizer(directory / "tokenizer.model")
    if core._encoder is None:
        print(
            "warning: the native encoder could not be built; the native rows are sentencepiece",
            file=sys.stderr,
        )
    backend = BaichuanTokenizerFast(
        vocab_file=str(directory / "tokenizer.model"), add_bos_token=False, native=False
    )
    return core, backend


def llama_tokenizer(gguf: Path) -> tuple[Callable[[str], list[int]] | None, str]:
    try:
        from llama_cpp import Llama
    except ImportError as error:
        return None, f"llama-cpp-python is not installed here ({error})"
    if not gguf.is_file():
        return None, f"no GGUF at {gguf}"
    llama = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    return (lambda text: llama.tokenize(text.encode(), add_bos=False, special=False)), "llama.cpp"


def time_rows(rows: dict[str, Callable[[str], list[int]]], texts: list[str]) -> dict[str, tuple[float, int]]:
    """Wall seconds and tokens per row, the rows taking turns on each block of texts."""
    seconds = dict.fromkeys(rows, 0.0)
    tokens = dict.fromkeys(rows, 0)
    names = list(rows)
    for encode in rows.values():  # untimed: lazy set-up (the native encoder is made on the first call)
        [encode(text) for text in texts[:BLOCK]]
    for b, start in enumerate(range(0, len(texts), BLOCK)):
        block = texts[start : start + BLOCK]
        for name in names[b % len(names) :] + names[: b % len(names)]:
            encode = rows[name]
            t0 = time.perf_counter()
            out = [encode(text) for text in block]
            seconds[name] += time.perf_counter() - t0
            tokens[name] += sum(map(len, out))
    return {name: (seconds[name], tokens[name]) for name in rows}


def batch_child(directory: str, sample: int) -> None:
    """In a child with RAYON_NUM_THREADS set: each batch row on each chunk in turn, with sentencepiece one text at
    a time as the reference; prints {row: [seconds, tokens]}."""
    fast, _, sp = load(Path(directory))
    core, backend = load_native(Path(directory))
    threads = int(os.environ["RAYON_NUM_THREADS"])
    texts = list(corpus_texts())[::sample]
    rows = {
        "AutoTokenizer": lambda chunk: fast(chunk, add_special_tokens=False)["input_ids"],
        "native": lambda chunk: core.encode_batch(chunk, threads),
        "tokenizers backend": lambda chunk: backend(chunk, add_special_tokens=False)["input_ids"],
        "sentencepiece batch": lambda chunk: sp.encode(chunk, num_threads=threads),
        "sentencepiece": lambda chunk: [sp.encode(text) for text in chunk],
    }
    out = {name: [0.0, 0] for name in rows}
    names = list(rows)
    for encode in rows.values():  # untimed: lazy set-up, thread work spaces
        encode(texts[:BATCH])
    for b, start in enumerate(range(0, len(texts), BATCH)):
        chunk = texts[start : start + BATCH]
        for name in names[b % len(names) :] + names[: b % len(names)]:
            t0 = time.perf_counter()
            ids = rows[name](chunk)
            out[name][0] += time.perf_counter() - t0
            out[name][1] += sum(map(len, ids))
    print(json.dumps(out))


def batch_rows(directory: Path, sample: int) -> dict[int, dict[str, list[float]]]:
    out = {}
    for threads in (1, 2):
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
        command = [sys.executable, __file__, "--batch-child", str(directory), "--sample", str(sample)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        out[threads] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def ratio_table(directory: Path, gguf: Path | None, sample: int) -> None:
    fast, slow, sp = load(directory)
    core, backend = load_native(directory)
    texts = list(corpus_texts())[::sample]
    megabytes = sum(len(text.encode()) for text in texts) / 1e6
    rows = {
        "sentencepiece": sp.encode,
        "ours fast (AutoTokenizer) encode": lambda text: fast.encode(text, add_special_tokens=False),
        "ours fast (AutoTokenizer) call": lambda text: fast(text, add_special_tokens=False)["input_ids"],
        "ours native (Tokenizer.encode)": core.encode,
        "ours fast, tokenizers backend (before) encode": lambda text: backend.encode(
            text, add_special_tokens=False
        ),
        "ours slow (BaichuanTokenizer) encode": lambda text: slow.encode(text, add_special_tokens=False),
    }
    llama, why = llama_tokenizer(gguf) if gguf else (None, "no GGUF for this vocabulary")
    if llama is not None:
        rows["llama.cpp (llama-cpp-python)"] = llama
    timed = time_rows(rows, texts)
    base = megabytes / timed["sentencepiece"][0]
    print(f"{len(texts):,} texts, {megabytes:.2f} MB, one text at a time, load average {os.getloadavg()}")
    print("| tokenizer | MB/s | tokens/s | × sentencepiece |\n|---|---|---|---|")
    for name, (seconds, tokens) in timed.items():
        speed = megabytes / seconds
        print(f"| {name} | {speed:.2f} | {tokens / seconds:,.0f} | {speed / base:.2f} |")
    for threads, timed_batches in batch_rows(directory, sample).items():
        reference = megabytes / timed_batches.pop("sentencepiece")[0]
        for name, (seconds, tokens) in timed_batches.items():
            speed = megabytes / seconds
            print(
                f"| {name}, batches of {BATCH}, {threads} thread{'s' if threads > 1 else ''} | {speed:.2f} | "
                f"{tokens / seconds:,.0f} | {speed / reference:.2f} (sentencepiece {reference:.2f} MB/s then) |"
            )
    if llama is None:
        print(f"llama.cpp column skipped: {why}")


def agreement(directory: Path) -> None:
    """Whole-corpus counts: ids, offsets and decoded text of ours against sentencepiece."""
    fast, slow, sp = load(directory)
    core, backend = load_native(directory)
    texts = list(corpus_texts())
    counts = dict.fromkeys(
        [
            "fast encode == sentencepiece",
            "fast batch == sentencepiece",
            "native encode == sentencepiece",
            "native batch, 2 threads == sentencepiece",
            "native offsets == sentencepiece",
            "tokenizers backend encode == sentencepiece",
            "slow encode == sentencepiece",
            "fast offsets == sentencepiece",
            "fast decode == sentencepiece",
            "slow decode == sentencepiece",
        ],
        0,
    )
    batches = itertools.chain.from_iterable(
        fast(texts[i : i + BATCH], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for i in range(0, len(texts), BATCH)
    )
    native_batches = itertools.chain.from_iterable(
        core.encode_batch(texts[i : i + BATCH], threads=2) for i in range(0, len(texts), BATCH)
    )
    for text, batch_ids, native_ids in zip(texts, batches, native_batches, strict=True):
        expected = sp.encode(text)
        counts["fast encode == sentencepiece"] += (
            fast.encode(text, add_special_tokens=False, split_special_tokens=True) == expected
        )
        counts["fast batch == sentencepiece"] += batch_ids == expected
        counts["native encode == sentencepiece"] += core.encode(text) == expected
        counts["native batch, 2 threads == sentencepiece"] += native_ids == expected
        sp_offsets = _sp_offsets(sp, text)
        counts["native offsets == sentencepiece"] += core.encode_with_offsets(text) == (expected, sp_offsets)
        counts["tokenizers backend encode == sentencepiece"] += (
            backend.encode(text, add_special_tokens=False, split_special_tokens=True) == expected
        )
        counts["slow encode == sentencepiece"] += (
            slow.encode(text, add_special_tokens=False, split_special_tokens=True) == expected
        )
        counts["fast offsets == sentencepiece"] += _offsets(fast, text) == sp_offsets
        reference = sp.decode(expected)
        counts["fast decode == sentencepiece"] += fast.decode(expected) == reference
        counts["slow decode == sentencepiece"] += slow.decode(expected) == reference
    print(f"agreement on the whole corpus ({len(texts):,} texts):")
    for name, count in counts.items():
        print(f"  {name}: {count:,}/{len(texts):,}")


def _offsets(fast, text: str) -> list[tuple[int, int]]:
    encoded = fast(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    return [tuple(span) for span in encoded["offset_mapping"]]


def _sp_offsets(sp, text: str) -> list[tuple[int, int]]:
    # sentencepiece gives byte spans of the input; transformers gives character spans.
    chars = [0] * (len(text.encode()) + 1)
    position = 0
    for i, char in enumerate(text):
        for _ in range(len(char.encode())):
            chars[position] = i
            position += 1
    chars[position] = len(text)
    return [(chars[p.begin], chars[p.end]) for p in sp.encode(text, return_type="proto").pieces]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=MODEL, help="a tokenizer.model (default: Baichuan-7B's)"
    )
    parser.add_argument("--gguf", type=Path, default=GGUF, help="the vocabulary GGUF for the llama.cpp row")
    parser.add_argument("--init", action="store_true", help="the tokenizer `baichuan init` trains, instead")
    parser.add_argument("--sample", type=int, default=1, help="time every N-th text (default: all)")
    parser.add_argument("--check", action="store_true", help="only the whole-corpus agreement")
    parser.add_argument("--no-check", action="store_true", help="only the ratio table")
    parser.add_argument("--batch-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_child:
        return batch_child(args.batch_child, args.sample)
    with tempfile.TemporaryDirectory() as tmp:
        model, gguf = args.model, args.gguf
        if args.init:
            from baichuan.scaffold import tokenizer_model

            model, gguf = Path(tmp) / "init.model", None
            model.write_bytes(tokenizer_model())
        directory = tokenizer_directory(model, Path(tmp))
        print(f"tokenizer: {'baichuan init (4,000 pieces)' if args.init else model}")
        if not args.check:
            ratio_table(directory, gguf, args.sample)
        if not args.no_check:
            agreement(directory)


if __name__ == "__main__":
    main()
