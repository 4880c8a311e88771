"""The evaluation harness end to end on a tiny random model and the real benchmark files: every multiple-choice
task runs and scores near chance (a random model knows nothing, so a score far from 25% means a broken
pipeline), batched scoring with the shared prefix's KV cache picks the same letters as one prompt at a time, runs
resume from the per-subject cache, and the result files carry what reproduces them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from baichuan.eval.harness import Runner, Settings, run_tasks, score_subject
from baichuan.eval.tasks import TASKS

# Questions per subject: enough that every task scores ~100+ questions.
LIMITS = {
    "ceval": 3,
    "mmlu": 3,
    "cmmlu": 2,
    "gaokao": 12,
    "agieval": 10,
    "jec_qa": 120,
    "medqa": 120,
    "medmcqa": 120,
    "ceval_medical": 100,  # all 90 val questions of its 3 subjects
    "mmlu_medical": 20,
    "cmmlu_medical": 20,
}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_runs_and_scores_near_chance(runner, data_root, tmp_path, task):
    results = run_tasks(runner, [task], data_root, Settings(limit=LIMITS[task], batch_size=16), tmp_path)
    result = results["tasks"][task]
    assert result["n"] >= 90
    # 4 options: chance is 25%. A random model mostly answers one letter, so it scores that letter's share of
    # the answers; the band allows for it and for ~100 questions of noise.
    assert 8.0 <= result["score"] <= 45.0, result["score"]
    assert all(0.0 <= v <= 100.0 for v in result["per_subject"].values())
    assert result["settings"]["shots"] == 5
    # 4,096 positions hold the 5-shot prompts, but for a few AGIEval passages (their shots are passages too)
    assert result["settings"]["questions_with_fewer_shots"] <= result["n"] // 10


def _tiny_model(position: str, vocab_size: int):
    from baichuan.config import preset
    from baichuan.model import Baichuan

    name = "baichuan2-7b" if position == "rope" else "baichuan2-13b"
    config = preset(name).replace(
        n_layers=2,
        dim=80,
        n_heads=10 if position == "alibi" else 4,
        ffn_dim=160,
        vocab_size=vocab_size,
        max_seq_len=4096,
    )
    torch.manual_seed(0)
    model = Baichuan(config)
    model.init_weights(std=0.2)  # larger than usual: logits that differ between letters
    return model.eval()


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_prefix_reuse_picks_the_same_letters_as_one_at_a_time(loaded, data_root, position):
    """The same per-question choice, and logits equal to float precision, batched with the prefix's cache or
    one prompt at a time through a plain forward."""
    from baichuan.eval import scoring
    from baichuan.eval.harness import subject_prompts

    model = _tiny_model(position, loaded.tokenizer.vocab_size)
    runner = Runner(model, loaded.tokenizer)
    task = TASKS["ceval"]
    (subject,) = [s for s in task.read(data_root, 1234) if s.name == "computer_network"]
    prompts, _ = subject_prompts(runner, task, subject, 5)
    prompts = prompts[:19]  # 19: the last batch of 8 is short
    assert scoring.common_prefix(prompts) > 300  # the header and five shots are shared
    letters = runner.letter_ids(task.format, "ABCD")
    fast = scoring.score_choices(model, prompts, letters, 8, share_prefix=True)
    slow = torch.cat([scoring.score_choices(model, [p], letters, 1, share_prefix=False) for p in prompts])
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert fast.argmax(1).tolist() == slow.argmax(1).tolist()
    assert len(set(slow.argmax(1).tolist())) > 1  # the letters vary, so the comparison means something

    settings = Settings(limit=19, batch_size=8)
    one = Settings(limit=19, batch_size=1, share_prefix=False)
    limited = dataclasses.replace(subject, questions=subject.questions[:19])
    assert (
        score_subject(runner, task, limited, settings)["predictions"]
        == score_subject(runner, task, limited, one)["predictions"]
    )


def test_resume_reads_finished_subjects_back(runner, data_root, tmp_path):
    settings = Settings(limit=2, batch_size=8)
    first = run_tasks(runner, ["ceval_medical"], data_root, settings, tmp_path)
    cache = tmp_path / "cache" / "ceval_medical" / "physician.json"
    saved = json.loads(cache.read_text(encoding="utf-8"))
    assert saved["settings"]["shots"] == 5 and saved["settings"]["seed"] == 1234
    # A result that could not come from the model shows that the subject was read back, not recomputed.
    saved["result"].update(accuracy=99.0, correct=2)
    cache.write_text(json.dumps(saved), encoding="utf-8")
    (tmp_path / "cache" / "ceval_medical" / "basic_medicine.json").unlink()  # as if stopped before it
    again = run_tasks(runner, ["ceval_medical"], data_root, settings, tmp_path)
    per_subject = again["tasks"]["ceval_medical"]["per_subject"]
    assert per_subject["physician"] == 99.0
    assert per_subject["basic_medicine"] == first["tasks"]["ceval_medical"]["per_subject"]["basic_medicine"]
    assert (tmp_path / "cache" / "ceval_medical" / "basic_medicine.json").is_file()
    # Other settings: computed again.
    changed = run_tasks(runner, ["ceval_medical"], data_root, Settings(limit=2, seed=7), tmp_path)
    assert changed["tasks"]["ceval_medical"]["per_subject"]["physician"] != 99.0


def test_result_files(runner, data_root, tmp_path):
    record = {"name": "tiny", "sha256": "ab" * 32, "dtype": "float32", "quantize": None}
    settings = Settings(limit=1, batch_size=8, record=record)
    run_tasks(runner, ["ceval", "mmlu", "cmmlu"], data_root, settings, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert results["model"]["sha256"] == "ab" * 32
    ceval, mmlu, cmmlu = (results["tasks"][n] for n in ("ceval", "mmlu", "cmmlu"))
    assert set(ceval["categories"]) == {"STEM", "Social Sciences", "Humanities", "Other", "Avg(Hard)"}
    assert set(mmlu["categories"]) == {"Humanities", "Social Sciences", "STEM", "Other"}
    assert "China specific" in cmmlu["categories"]
    assert (
        len(ceval["per_subject"]) == 52 and len(mmlu["per_subject"]) == 57 and len(cmmlu["per_subject"]) == 67
    )
    # C-Eval and CMMLU average subjects; MMLU (hendrycks) averages questions: with 1 question each, the same.
    assert ceval["score"] == pytest.approx(sum(ceval["per_subject"].values()) / 52)
    for task in (ceval, mmlu, cmmlu):
        s = task["settings"]
        assert s["shots"] == 5 and s["dtype"] == "float32" and s["sha256"]
        assert "{question}" in s["prompt_format"]["item"]
    # C-Eval's dev shots are shuffled with the seed; hendrycks and CMMLU take dev in file order.
    assert [t["settings"]["shot_seed"] for t in (ceval, mmlu, cmmlu)] == [1234, None, None]
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| Model | C-Eval | MMLU | CMMLU |" in md
    assert "| Model | Average | Avg(Hard) | STEM | Social Sciences | Humanities | Other |" in md
    assert "| Model | Humanities | Social Sciences | STEM | Other | Average |" in md
    assert f"| tiny | {ceval['score']:.2f} | {mmlu['score']:.2f} | {cmmlu['score']:.2f} |" in md


def test_chat_wraps_every_prompt_in_the_chat_format(loaded, data_root, tmp_path):
    runner = Runner(loaded.model, loaded.tokenizer, loaded.chat_format, True, loaded.add_bos)
    ids = runner.ids("问题")
    assert ids[0] == loaded.chat_format.user_id and ids[-1] == loaded.chat_format.assistant_id
    results = run_tasks(runner, ["ceval_medical"], data_root, Settings(limit=2), tmp_path)
    assert results["tasks"]["ceval_medical"]["settings"]["chat"] is True
    assert results["settings"]["chat"] is True


def test_generation_tasks_dispatch_to_the_generative_module(runner, data_root, tmp_path):
    pytest.importorskip("baichuan.eval.generative")
    results = run_tasks(runner, ["gsm8k"], data_root, Settings(limit=1, batch_size=1), tmp_path)
    gsm8k = results["tasks"]["gsm8k"]
    assert gsm8k["n"] == 1 and gsm8k["score"] in (0.0, 100.0)
    assert (tmp_path / "cache" / "gsm8k.json").is_file()
    assert "GSM8K" in (tmp_path / "results.md").read_text(encoding="utf-8")


def test_checksum_is_cached(checkpoint, tmp_path):
    import hashlib

    from baichuan.eval.harness import weights_checksum

    cache = tmp_path / "sums.json"
    first = weights_checksum(checkpoint, cache)
    expected = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert first["files"]["model.safetensors"] == expected
    entries = json.loads(cache.read_text(encoding="utf-8"))
    assert list(entries.values()) == [expected]
    assert weights_checksum(checkpoint, cache) == first
