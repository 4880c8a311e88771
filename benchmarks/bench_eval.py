"""Multiple-choice evaluation speed (issue 13): questions/s for 5-shot C-Eval val on a ~100M random model, three
ways, with the same questions and the same prompt strings, and how often they pick the same letter.

    python benchmarks/bench_eval.py                          # ~104M model, all 1,346 C-Eval val questions
    python benchmarks/bench_eval.py --limit 4 --dim 64 --layers 1 --heads 4 --ffn 128   # smoke run

Rows:
- ours, batched: `baichuan.eval` as `baichuan eval` runs it: each subject's shared few-shot prefix computed once
  and its KV cache reused by every batch of `--batch-size` questions, all four letters read from one forward;
- ours, one at a time: the same code with no prefix reuse and batch size 1 (a full forward per question);
- lm-eval hf: lm-evaluation-harness's `hf` backend (HFLM over our transformers face, same checkpoint, same dtype,
  batch size `--lm-eval-batch-size`) on a local multiple-choice task whose documents are our prompt strings and
  whose choices are the letters (target_delimiter "", as the letter follows "答案：" in C-Eval's prompt).

Times are wall-clock over all questions, prompt building and tokenization included; loading the model is not
timed (lm-eval's HFLM is built before its clock starts). The model is random (`baichuan init` weights, the real
64k vocabulary, 4,096 positions) because speed does not depend on what it knows; agreement on a random model is
a hard test (its letter logits are close), so a disagreement is a near tie, shown with its logit gap.
Needs ../shared/data and lm-eval (`pip install -e .[eval]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def build_model(directory: Path, args) -> Path:
    from baichuan.config import preset
    from baichuan.scaffold import init_checkpoint

    config = preset("baichuan2-7b").replace(
        n_layers=args.layers,
        dim=args.dim,
        n_heads=args.heads,
        ffn_dim=args.ffn,
        vocab_size=64_000,
        max_seq_len=4096,
    )
    print(f"model: {config.num_params() / 1e6:.1f}M parameters ({args.layers} layers, dim {args.dim})")
    return init_checkpoint(
        config, directory, dtype=torch.float32, tokenizer=SHARED / "baichuan-7b-tokenizer" / "tokenizer.model"
    )


def ours(runner, subjects, batch_size: int, share_prefix: bool) -> tuple[float, list[str], list[list[float]]]:
    from baichuan.eval import scoring
    from baichuan.eval.harness import subject_prompts
    from baichuan.eval.tasks import TASKS

    task = TASKS["ceval"]
    letters, logits = [], []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for subject in subjects:
        prompts, _ = subject_prompts(runner, task, subject, 5)
        choice_ids = runner.letter_ids(task.format, "ABCD")
        scores = scoring.score_choices(
            runner.model,
            prompts,
            choice_ids,
            batch_size,
            share_prefix=share_prefix,
            pad_id=runner.tokenizer.pad_id,
        )
        logits += scores.tolist()
        letters += ["ABCD"[i] for i in scores.argmax(1).tolist()]
    sync()
    return time.perf_counter() - start, letters, logits


def lm_eval_run(checkpoint: Path, texts: list[str], dtype: str, device: str, batch_size: int, work: Path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import baichuan  # noqa: F401  (registers the Auto classes)

    data = work / "questions.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": t, "label": 0}, ensure_ascii=False) + "\n" for t in texts),
        encoding="utf-8",
    )
    (work / "bench_ceval.yaml").write_text(
        "task: bench_ceval\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_choice: ["A", "B", "C", "D"]\ndoc_to_target: label\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n',
        encoding="utf-8",
    )
    lm = HFLM(pretrained=str(checkpoint), dtype=dtype, device=device, batch_size=batch_size)
    manager = TaskManager(include_path=str(work), include_defaults=False)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["bench_ceval"], task_manager=manager, log_samples=True)
    seconds = time.perf_counter() - start
    samples = sorted(out["samples"]["bench_ceval"], key=lambda s: s["doc_id"])
    letters = ["ABCD"[max(range(4), key=lambda i: s["filtered_resps"][i][0])] for s in samples]
    return seconds, letters


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=None, help="questions per subject (default: all of val)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lm-eval-batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1376)
    parser.add_argument("--skip-one-at-a-time", action="store_true")
    parser.add_argument("--skip-lm-eval", action="store_true")
    args = parser.parse_args()

    from baichuan.eval.harness import Runner
    from baichuan.eval.tasks import TASKS, format_for
    from baichuan.runtime import load_for_inference

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = build_model(work / "model", args)
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
        loaded = load_for_inference(checkpoint, args.device, short)
        runner = Runner(loaded.model, loaded.tokenizer, add_bos=loaded.add_bos)
        task = TASKS["ceval"]
        subjects = task.read(SHARED, 1234)
        if args.limit:
            subjects = [dataclasses.replace(s, questions=s.questions[: args.limit]) for s in subjects]
        n = sum(len(s.questions) for s in subjects)
        texts = [format_for(task, s).prompt(s.title, s.shots[:5], q) for s in subjects for q in s.questions]
        print(f"{n} questions, 5-shot C-Eval val, {args.device}, {args.dtype}")

        ours(runner, subjects[:1], args.batch_size, True)  # warm-up (kernels, allocator)
        rows = {}
        seconds, fast, fast_logits = ours(runner, subjects, args.batch_size, True)
        rows[f"ours, batched ({args.batch_size}) with prefix reuse"] = (seconds, fast)
        if not args.skip_one_at_a_time:
            seconds, slow, _ = ours(runner, subjects, 1, False)
            rows["ours, one at a time"] = (seconds, slow)
        if not args.skip_lm_eval:
            del loaded, runner
            seconds, theirs = lm_eval_run(
                checkpoint, texts, args.dtype, args.device, args.lm_eval_batch_size, work
            )
            rows[f"lm-eval hf (batch {args.lm_eval_batch_size})"] = (seconds, theirs)

        base = rows.get(next((k for k in rows if k.startswith("lm-eval")), ""), None)
        print(
            "\n| way | seconds | questions/s | vs lm-eval | same letter as batched |\n|---|---:|---:|---:|---:|"
        )
        for name, (seconds, letters) in rows.items():
            ratio = f"{base[0] / seconds:.2f}x" if base else "-"
            same = sum(a == b for a, b in zip(letters, fast, strict=True))
            print(f"| {name} | {seconds:.1f} | {n / seconds:.1f} | {ratio} | {same}/{n} |")
        for name, (_, letters) in rows.items():
            for i, (a, b) in enumerate(zip(letters, fast, strict=True)):
                if a != b:
                    top = sorted(fast_logits[i], reverse=True)
                    print(f"  {name}: question {i} {a} vs {b}; batched top-2 logit gap {top[0] - top[1]:.2e}")


if __name__ == "__main__":
    main()
