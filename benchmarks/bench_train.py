"""Training speed and learning on this machine: `baichuan/train` against a plain PyTorch loop, and a small
Baichuan2-shaped model trained on the shared corpus. Run it alone: it measures the whole machine.

    PYTHONPATH=. python benchmarks/bench_train.py speed                 # ~20M, ~100M, ~400M models
    PYTHONPATH=. python benchmarks/bench_train.py learn --minutes 30    # tokenizer, data, 30 min of training

speed: for each size, tokens/s and MFU of `baichuan.train.loop.train` (our model, our loop, in the precision it
picks: bf16 autocast where the CPU computes bf16 natively, else fp32) and of a nanoGPT-style baseline of the same
shape (a self-contained model class below: RMSNorm, RoPE, SwiGLU, SDPA; one torch.optim.AdamW loop; no compile)
in the same precision, on the same random token batches. MFU = model FLOPs per token (PaLM's count, see
`loop.flops_per_token`) x tokens/s / the best n x n matmul FLOP/s measured at the start of this run in the compute
dtype. The first --warmup steps of each are not timed.

learn: trains a tokenizer (--vocab-size) on the shared corpus with 1 line in 20 held out, prints the compression
table of it against the real Baichuan-7B vocabulary on the held-out lines, tokenises the corpus (every 50th
document held out), trains a Baichuan2-shaped model (NormHead, max-z loss; default ~30M parameters) for --minutes,
and reports held-out perplexity of the trained model against the same model untrained, the loss curve (loss.png
in --out) and greedy samples.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baichuan.config import Config
from baichuan.model import Baichuan
from baichuan.train.loop import TrainConfig, flops_per_token, matmul_peak, resolve_precision, train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# ~20M, ~100M, ~400M parameters with a 16k vocabulary (embeddings and head included).
SIZES = {
    "20M": dict(n_layers=6, dim=384, n_heads=6, ffn_dim=1024),
    "100M": dict(n_layers=12, dim=768, n_heads=12, ffn_dim=2048),
    "400M": dict(n_layers=24, dim=1024, n_heads=16, ffn_dim=3584),
}


# --- the nanoGPT-style baseline -------------------------------------------------------------------------------


class PlainBlock(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_heads = c.n_heads
        self.norm1, self.norm2 = nn.RMSNorm(c.dim, eps=1e-6), nn.RMSNorm(c.dim, eps=1e-6)
        self.qkv = nn.Linear(c.dim, 3 * c.dim, bias=False)
        self.proj = nn.Linear(c.dim, c.dim, bias=False)
        self.gate = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.up = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.down = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)

        def rope(t):
            a, b = t.chunk(2, dim=-1)
            return t * cos + torch.cat((-b, a), dim=-1) * sin

        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class PlainGPT(nn.Module):
    def __init__(self, c: Config, seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.blocks = nn.ModuleList(PlainBlock(c) for _ in range(c.n_layers))
        self.norm = nn.RMSNorm(c.dim, eps=1e-6)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        d = c.head_dim
        freqs = 1.0 / (10_000 ** (torch.arange(0, d, 2).float() / d))
        angles = torch.outer(torch.arange(seq_len).float(), freqs).repeat(1, 2)  # (T, D)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        return self.head(self.norm(x))


def plain_tokens_per_s(model, batches, steps, warmup, autocast_dtype) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for step in range(warmup + steps):
        ids = batches[step % len(batches)]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times)


class FixedBatches:
    global_batch: int

    def __init__(self, batches: list[torch.Tensor]):
        self.batches, self.global_batch, self.seq_len = batches, batches[0].shape[0], batches[0].shape[1]

    def micro_batches(self, step):
        return [self.batches[step % len(self.batches)]]

    def state_dict(self):
        return {}


def speed(args) -> None:
    torch.manual_seed(0)
    autocast_dtype, note = resolve_precision(args.precision, torch.device("cpu"))
    dtype = autocast_dtype or torch.float32
    peak = matmul_peak(dtype, torch.device("cpu"), seconds=3.0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; precision: {note}")
    print(f"matmul peak ({str(dtype)[6:]}, best 2048^3 product): {peak / 1e9:,.1f} GFLOP/s\n")
    print("| model | params | batch x seq | loop | tokens/s | MFU |")
    print("|---|---|---|---|---|---|")
    for name in args.sizes.split(","):
        config = Config(
            vocab_size=args.vocab, position="rope", norm_head=True, max_seq_len=args.seq_len, **SIZES[name]
        )
        batches = [torch.randint(3, args.vocab, (args.batch_size, args.seq_len)) for _ in range(4)]
        flops = flops_per_token(config, args.seq_len)
        model = Baichuan(config)
        model.init_weights()
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(
                max_steps=args.warmup + args.steps, lr=3e-4, precision=args.precision, progress=False,
                tensorboard=False, plot=False, measure_peak=False, save=False,
            )  # fmt: skip
            train(model, FixedBatches(batches), cfg, out, say=lambda _: None)
            rates = [
                float(line.split(",")[5]) for line in (Path(out) / "loss.csv").read_text().splitlines()[1:]
            ]
        ours = statistics.median(rates[args.warmup :])
        del model
        plain = PlainGPT(config, args.seq_len)
        theirs = plain_tokens_per_s(plain, batches, args.steps, args.warmup, autocast_dtype)
        del plain
        shape = f"{args.batch_size} x {args.seq_len}"
        params = f"{config.num_params() / 1e6:,.0f} M"
        for loop, rate in (("baichuan.train", ours), ("nanoGPT-style baseline", theirs)):
            print(
                f"| {name} | {params} | {shape} | {loop} | {rate:,.0f} | {100 * rate * flops / peak:.1f}% |",
                flush=True,
            )


# --- learning ----------------------------------------------------------------------------------------------------


def learn(args) -> None:
    from baichuan.checkpoint import fold_norm_head
    from baichuan.generate import SamplingConfig, generate
    from baichuan.tokenizer import Tokenizer
    from baichuan.train.data import PackedBatches, TokenFile, iter_documents, prepare_data
    from baichuan.train.tokenizer import load_encoder, tokenizer_stats, train_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [line for doc in iter_documents([args.corpus]) for line in doc.split("\n") if line.strip()]
    heldout = lines[::20]
    training = [line for i, line in enumerate(lines) if i % 20]
    tok = out / "tokenizer"
    if args.tokenizer:
        tok = Path(args.tokenizer)
    else:
        start = time.perf_counter()
        trained = train_tokenizer(training, args.vocab_size, tok, args.input_sentence_size)
        print(
            f"tokenizer: {trained.vocab_size:,} pieces trained on {trained.sentences_used:,} of "
            f"{trained.sentences_seen:,} lines in {time.perf_counter() - start:.0f}s"
        )
    print(f"\n### Tokenizer compression on {len(heldout):,} held-out lines (1 in 20)\n")
    print("| tokenizer | zh tokens/char | en tokens/char | bytes/token | encode MB/s |")
    print("|---|---|---|---|---|")
    for name, path in (("trained here", tok), ("Baichuan-7B (64,000)", DATA / "baichuan-7b-tokenizer")):
        s = tokenizer_stats(load_encoder(path), heldout)
        print(
            f"| {name} | {s.zh_tokens_per_char:.3f} | {s.en_tokens_per_char:.3f} | {s.bytes_per_token:.2f} | {s.mb_per_s:.2f} |"
        )

    data = out / "data"
    report = prepare_data([args.corpus], tok, data, val_every=50)
    print(
        f"\ndata: {report.tokens:,} training tokens, {report.val_tokens:,} held out, in {report.seconds:.0f}s"
    )
    tokens = TokenFile.open(data)
    config = Config(
        vocab_size=tokens.vocab_size, dim=args.hidden, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.ffn,
        position="rope", norm_head=True, z_loss_weight=2e-4, max_seq_len=args.seq_len,
    )  # fmt: skip
    print(
        f"model: Baichuan2-shaped, {config.num_params() / 1e6:.1f} M parameters ({args.layers} layers, hidden {args.hidden})"
    )
    model = Baichuan(config)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    batches = PackedBatches(tokens.tokens, args.seq_len, args.batch_size, seed=0)
    # Steps for --minutes: time a few steps of the real loop first.
    probe = TrainConfig(
        max_steps=3, progress=False, tensorboard=False, plot=False, measure_peak=False, save=False
    )
    start = time.perf_counter()
    train(model, batches, probe, out / "probe", say=lambda _: None)
    per_step = (time.perf_counter() - start) / 3
    model.load_state_dict(untrained)
    steps = args.max_steps or max(10, int(args.minutes * 60 / per_step))
    print(
        f"training {steps:,} steps of {args.batch_size} x {args.seq_len} tokens (~{steps * per_step / 60:.0f} min)"
    )
    cfg = TrainConfig(
        max_steps=steps, lr=args.lr, save_every=max(1, steps // 4), log_every=max(1, steps // 20)
    )
    result = train(model, batches, cfg, out / "run")
    print(
        f"loss: first {result.losses[0]:.3f}, last 20 mean {np.nanmean(result.losses[-20:]):.3f}; curve {out / 'run' / 'loss.png'}"
    )

    val = TokenFile.open(data, "val").tokens
    windows = torch.from_numpy(np.asarray(val[: (len(val) // args.seq_len) * args.seq_len], dtype=np.int64))
    windows = windows.view(-1, args.seq_len)[: args.eval_windows]

    @torch.inference_mode()
    def perplexity(m) -> float:
        m.eval()
        nll = sum(
            F.cross_entropy(m(w)[:, :-1].flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
            for w in windows.split(8)
        )
        return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))

    trained_ppl = perplexity(model)
    fresh = Baichuan(config)
    fresh.load_state_dict(untrained)
    print(
        f"\nheld-out perplexity on {windows.numel():,} tokens: untrained {perplexity(fresh):,.1f}, trained {trained_ppl:,.1f}"
    )
    tokenizer = Tokenizer(tok / "tokenizer.model")
    fold_norm_head(model.eval())
    sampling = SamplingConfig(max_new_tokens=40, vocab_size=tokens.vocab_size)
    for prompt in ("话说天下大势，", "第一回", "To be, or not", "It is a truth universally"):
        ids = generate(model, [tokenizer.encode(prompt)], sampling)[0]
        print(f"  {prompt!r} -> {tokenizer.decode(ids)!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--sizes", default=",".join(SIZES))
    s.add_argument("--vocab", type=int, default=16_000)
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--steps", type=int, default=10, help="timed steps per loop and size")
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--precision", default="auto", help="auto (bf16 where native), bf16, fp32")
    le = sub.add_parser("learn")
    le.add_argument("--corpus", default=str(DATA / "pretrain_corpus"))
    le.add_argument("--out", default="runs/bench-learn")
    le.add_argument("--tokenizer", default=None, help="use this tokenizer directory instead of training one")
    le.add_argument("--vocab-size", type=int, default=16_000)
    le.add_argument("--input-sentence-size", type=int, default=2_000_000)
    le.add_argument("--layers", type=int, default=6)
    le.add_argument("--hidden", type=int, default=384)
    le.add_argument("--heads", type=int, default=6)
    le.add_argument("--ffn", type=int, default=1024)
    le.add_argument("--seq-len", type=int, default=256)
    le.add_argument("--batch-size", type=int, default=16)
    le.add_argument("--lr", type=float, default=1e-3)
    le.add_argument("--minutes", type=float, default=30.0)
    le.add_argument("--max-steps", type=int, default=0, help="fixed step count instead of --minutes")
    le.add_argument("--eval-windows", type=int, default=64)
    args = p.parse_args()
    if args.mode == "speed":
        speed(args)
    else:
        if not Path(args.corpus).is_dir():
            sys.exit(f"corpus {args.corpus} not found (see ../shared/data/README.md); pass --corpus")
        learn(args)


if __name__ == "__main__":
    main()
