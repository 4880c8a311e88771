"""lm-evaluation-harness's `hf` backend runs our model through the transformers face (`import baichuan` registers
the Auto classes; no trust_remote_code) on a local task written here, and picks the same answer letter per
question as our scorer given the same prompts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from baichuan.eval.harness import Runner, subject_prompts
from baichuan.eval.tasks import TASKS, format_for


def local_task(directory, prompts: list[str], labels: list[int]) -> str:
    """A multiple-choice task YAML over a jsonl of ready prompts: the letter follows the prompt directly
    (target_delimiter ""), as in C-Eval's "答案：A"."""
    data = directory / "questions.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "label": y}, ensure_ascii=False) + "\n"
            for p, y in zip(prompts, labels, strict=True)
        ),
        encoding="utf-8",
    )
    (directory / "baichuan_local_mc.yaml").write_text(
        "task: baichuan_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: ["A", "B", "C", "D"]\n'
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return "baichuan_local_mc"


def test_lm_eval_hf_backend_runs_our_model(checkpoint, loaded, data_root, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import baichuan  # noqa: F401  (registers AutoModelForCausalLM for model_type "baichuan")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = TASKS["ceval"]
    (subject,) = [s for s in task.read(data_root, 1234) if s.name == "computer_network"]
    questions = subject.questions[:8]
    fmt = format_for(task, subject)
    texts = [fmt.prompt(subject.title, subject.shots[:5], q) for q in questions]
    labels = ["ABCD".index(q.answer) for q in questions]
    name = local_task(tmp_path, texts, labels)

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={checkpoint},dtype=float32,device=cpu",
        tasks=[name],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        batch_size=4,
        log_samples=True,
    )
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    theirs = [max(range(4), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
    assert 0.0 <= out["results"][name]["acc,none"] <= 1.0

    runner = Runner(loaded.model, loaded.tokenizer, add_bos=loaded.add_bos)
    limited = dataclasses.replace(subject, questions=questions)
    prompts, _ = subject_prompts(runner, task, limited, 5)
    from baichuan.eval.scoring import score_choices

    ours = score_choices(loaded.model, prompts, runner.letter_ids(fmt, "ABCD"), 4)
    assert theirs == ours.argmax(1).tolist()
    # Their log-likelihoods are our letter logits, log-softmaxed over the whole vocabulary: same ordering.
    loglik = torch.tensor([[r[0] for r in s["filtered_resps"]] for s in samples])
    torch.testing.assert_close(loglik.argsort(1), ours.argsort(1))
