"""Fine-tuning: full and LoRA runs write what chat/peft/merge-lora load; the merged logits are base + adapter;
resume is exact; 2 processes (DDP, gloo) give the losses of 1; QLoRA on CPU passes gradients through the
dequantised weights; unknown LoRA targets name the real ones."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from baichuan.checkpoint import load_model
from baichuan.cli import app
from baichuan.config import ConfigError, preset
from baichuan.lora import apply_adapter, read_adapter
from baichuan.train.finetune import FinetuneConfig, check_lora_targets, finetune
from tests.train.conftest import REPO, repo_env, run_processes

QUIET = dict(progress=False, tensorboard=False, plot=False, precision="fp32", log_every=100)


def losses(out) -> list[float]:
    with open(out / "loss.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir):
    from baichuan.scaffold import init_checkpoint

    directory = tmp_path_factory.mktemp("base")
    config = preset("baichuan2-7b").replace(
        n_layers=2, dim=64, n_heads=4, ffn_dim=128, vocab_size=4000, max_seq_len=256
    )
    return init_checkpoint(
        config, directory, dtype=torch.float32, tokenizer=tokenizer_dir / "tokenizer.model"
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from baichuan.scaffold import sample_text

    lines = sample_text(96, seed=5)
    records = [
        {"conversations": [{"from": "human", "value": lines[i]}, {"from": "gpt", "value": lines[i + 1]}]}
        for i in range(0, len(lines), 2)
    ]
    path = tmp_path_factory.mktemp("sft") / "data.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def run(base, data, out, **overrides) -> list[float]:
    settings = dict(model=str(base), data=str(data), output_dir=str(out), batch_size=2, model_max_length=48)
    settings.update(QUIET)
    settings.update(overrides)
    return finetune(FinetuneConfig(**settings), say=lambda _: None).losses


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base, data):
    out = tmp_path_factory.mktemp("lora")
    run(base, data, out, lora=True, lora_target=("W_pack", "down_proj"), max_steps=6, lr=2e-2)
    return out


def test_unknown_lora_target_lists_the_real_names(base):
    model = load_model(base)
    with pytest.raises(
        ConfigError, match=r"q_proj \(q, k and v are fused in W_pack\).*W_pack, o_proj, gate_proj"
    ):
        check_lora_targets(model, ("q_proj",))
    check_lora_targets(model, ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"))
    result = CliRunner().invoke(
        app, ["finetune", "--model", str(base), "--data", "x.json", "--lora", "--lora-target", "qkv"]
    )
    assert result.exit_code == 1 and "unknown LoRA target" in result.output


def test_full_finetune_writes_an_official_checkpoint_and_learns(tmp_path, base, data):
    curve = run(base, data, tmp_path, max_steps=8, lr=3e-3)
    assert curve[-1] < curve[0]
    model = load_model(tmp_path)  # config.json, weights and tokenizer in the official layout
    assert {"tokenizer.model", "generation_config.json", "loss.csv"} <= {p.name for p in tmp_path.iterdir()}
    before = load_model(base).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adapter_merge_equals_peft_and_the_cli(tmp_path, base, adapter):
    from peft import AutoPeftModelForCausalLM

    import baichuan  # noqa: F401  (registers the Auto classes)

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] and config["task_type"] == "CAUSAL_LM" and config["r"] == 8
    ids = torch.randint(3, 4000, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        plain = load_model(base)(ids)
        merged_here = load_model(base)
        apply_adapter(merged_here, adapter)
        assert (expected - plain).abs().max() > 1e-3  # the adapter changes the output
        torch.testing.assert_close(merged_here(ids), expected, rtol=1e-4, atol=1e-4)
    result = CliRunner().invoke(
        app, ["merge-lora", "--model", str(base), "--lora", str(adapter), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m")(ids), expected, rtol=1e-4, atol=1e-4)


def test_generate_with_lora_equals_the_merged_model(tmp_path, base, adapter):
    merged = tmp_path / "m"
    assert (
        CliRunner()
        .invoke(app, ["merge-lora", "-m", str(base), "--lora", str(adapter), "--out", str(merged)])
        .exit_code
        == 0
    )
    args = ["generate", "--prompt", "the model", "--greedy", "--max-new-tokens", "8", "--dtype", "fp32"]
    with_lora = CliRunner().invoke(app, [*args, "-m", str(base), "--lora", str(adapter)])
    plain = CliRunner().invoke(app, [*args, "-m", str(merged)])
    assert with_lora.exit_code == 0, with_lora.output
    assert with_lora.stdout == plain.stdout and with_lora.stdout.strip()
    bad = CliRunner().invoke(app, [*args, "-m", str(base), "--lora", str(tmp_path)])
    assert bad.exit_code == 1 and "no adapter_config.json" in bad.output


@pytest.mark.parametrize(
    "lora, precision", [(False, "fp32"), (True, "fp32"), (True, "bf16")], ids=["full", "lora", "lora-bf16"]
)
def test_resume_continues_the_same_loss_trajectory(tmp_path, base, data, lora, precision):
    settings = dict(
        max_steps=4,
        save_every=2,
        keep_last=0,
        lr=1e-2 if lora else 3e-3,
        lora=lora,
        lora_dropout=0.1,
        precision=precision,
    )
    whole = run(base, data, tmp_path, **settings)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")
    resumed = run(base, data, tmp_path, resume=True, **settings)
    assert len(resumed) == 2
    np.testing.assert_allclose(resumed, whole[2:], rtol=1e-6)
    np.testing.assert_allclose(losses(tmp_path), whole, rtol=1e-6)


def test_lora_base_stored_in_the_autocast_dtype_computes_the_same(base):
    """Under bf16 autocast a frozen fp32 weight is cast to bf16 in every product anyway: stored cast, the loss and
    the adapter's gradients are those of the fp32 base, and the base weighs half."""
    from baichuan.train.finetune import build_model, sft_loss, store_frozen_base

    cfg = FinetuneConfig(model=str(base), lora=True, lora_target=("W_pack", "down_proj"), lora_dropout=0.0)
    torch.manual_seed(0)
    model, _ = build_model(cfg, torch.device("cpu"), lambda _: None)
    with torch.no_grad():  # B starts at zero; nonzero, the adapters change the output and A gets gradients
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sft_loss(model(ids), ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def nbytes():  # all but the embeddings, which stay fp32 (most of this tiny model)
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)

    loss, grads = loss_and_grads()
    before = nbytes()
    assert store_frozen_base(model, torch.bfloat16) == 2 * 5 + 1  # every linear of the 2 layers, and the head
    params = dict(model.named_parameters())
    assert params["model.layers.0.self_attn.W_pack.base_layer.weight"].dtype == torch.bfloat16
    assert params["lm_head.weight"].dtype == torch.bfloat16
    assert params["model.layers.0.self_attn.W_pack.lora_A.default.weight"].dtype == torch.float32
    assert params["model.embed_tokens.weight"].dtype == torch.float32
    assert params["model.norm.weight"].dtype == torch.float32
    assert nbytes() < 0.6 * before
    loss2, grads2 = loss_and_grads()
    assert grads and grads.keys() == grads2.keys()
    torch.testing.assert_close(loss2, loss, rtol=1e-4, atol=0)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-3, atol=1e-6, msg=name)
    assert store_frozen_base(model, None) == 0  # fp32 training: nothing to do


def test_two_processes_equal_one(tmp_path, base, data):
    common = [
        "finetune", "--model", str(base), "--data", str(data), "--model-max-length", "48", "--max-steps", "3",
        "--lr", "3e-3", "--precision", "fp32", "--no-progress", "--no-tensorboard", "--no-plot",
    ]  # fmt: skip
    one = subprocess.run(
        [sys.executable, "-m", "baichuan.cli", *common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")],
        env=repo_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    two = run_processes(
        [*prefix, "-m", "baichuan.cli", *common, "--batch-size", "2", "--output-dir", str(tmp_path / "two")],
        300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 rank(s)" in two.stdout + two.stderr
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)


def test_qlora_on_cpu_trains_through_dequantised_weights(tmp_path, base, data):
    from baichuan.lora import TrainableQuantized
    from baichuan.quant.int4 import Int4Linear

    # The gradient reaching the input is that of a float linear holding the dequantised weight.
    torch.manual_seed(0)
    q = Int4Linear.from_weight(torch.randn(48, 64), group_size=32)
    x = torch.randn(3, 64, requires_grad=True)
    TrainableQuantized(q)(x).sum().backward()
    w = q.dequantize().requires_grad_(False)
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    curve = run(base, data, tmp_path, lora=True, quantize=4, max_steps=6, lr=2e-2)
    assert all(np.isfinite(curve)) and min(curve[-2:]) < curve[0]
    assert read_adapter(tmp_path).pairs  # an adapter of the float base's layer names
    with pytest.raises(ConfigError, match="add --lora"):
        run(base, data, tmp_path / "x", quantize=4, max_steps=1)


def test_dry_run_prints_an_example_and_the_histogram(base, data):
    result = CliRunner().invoke(
        app, ["finetune", "--model", str(base), "--data", str(data), "--dry-run", "--model-max-length", "16"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "example 1" in result.output
        and "token lengths" in result.output
        and "longer than 16 tokens" in result.output
    )


def test_missing_tokenizer_is_named(tmp_path, base, data):
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    (bare / "tokenizer.model").unlink()
    result = CliRunner().invoke(app, ["finetune", "--model", str(bare), "--data", str(data), "--dry-run"])
    assert result.exit_code == 1 and "pass --tokenizer DIR" in result.output
    result = CliRunner().invoke(
        app, ["finetune", "--model", str(bare), "--tokenizer", str(base), "--data", str(data), "--dry-run"]
    )
    assert result.exit_code == 0, result.output


def test_chat_and_serve_take_the_adapter(tmp_path, base, adapter, monkeypatch):
    from baichuan.generate import stream_text
    from baichuan.runtime import load_for_inference

    merged = tmp_path / "m"
    assert (
        CliRunner()
        .invoke(app, ["merge-lora", "-m", str(base), "--lora", str(adapter), "--out", str(merged)])
        .exit_code
        == 0
    )
    chat = CliRunner().invoke(
        app, ["chat", "-m", str(base), "--lora", str(adapter), "--greedy", "--max-new-tokens", "4", "--dtype", "fp32"],
        input="hello\n/exit\n",
    )  # fmt: skip
    assert chat.exit_code == 0, chat.output
    assert "LoRA adapter" in chat.output and "applied (4 layers)" in chat.output
    # The server: the app `baichuan serve --lora` would serve, answering as the merged checkpoint does.
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: apps.append(self.config.app))
    served = CliRunner().invoke(
        app,
        [
            "serve",
            "-m",
            str(base),
            "--lora",
            str(adapter),
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--max-batch",
            "1",
        ],
    )
    assert served.exit_code == 0, served.output
    reference = load_for_inference(merged, "cpu", "fp32")
    ids = reference.tokenizer.encode("the model")
    sampling = reference.sampling.replace(max_new_tokens=8, do_sample=False)
    expected = "".join(stream_text(reference.model, reference.tokenizer, ids, sampling))
    with TestClient(apps[0], base_url="http://127.0.0.1") as client:
        body = {"model": base.name, "prompt": "the model", "temperature": 0, "max_tokens": 8}
        answer = client.post("/v1/completions", json=body).json()
    assert answer.get("choices", [{}])[0].get("text") == expected and expected, answer


def test_accumulation_equals_a_larger_batch(tmp_path, base, data):
    whole = run(base, data, tmp_path / "a", batch_size=4, max_steps=3, lr=3e-3)
    accumulated = run(base, data, tmp_path / "b", batch_size=2, grad_accum=2, max_steps=3, lr=3e-3)
    np.testing.assert_allclose(accumulated, whole, rtol=1e-5)


def test_deepspeed_zero2_equals_the_plain_loop(tmp_path, base, data):
    pytest.importorskip("deepspeed")
    plain = run(base, data, tmp_path / "plain", max_steps=3, lr=3e-3)
    zero = run(
        base,
        data,
        tmp_path / "zero",
        max_steps=3,
        lr=3e-3,
        deepspeed=str(REPO / "configs/deepspeed/zero2.json"),
    )
    np.testing.assert_allclose(zero, plain, rtol=1e-5)
    assert (tmp_path / "zero" / "model.safetensors").is_file()  # the official-layout output, as without it
    with pytest.raises(ConfigError, match="full fine-tuning"):
        run(base, data, tmp_path / "x", lora=True, deepspeed="configs/deepspeed/zero2.json")


def test_fp16_trains_with_loss_scaling_and_a_warning(tmp_path, base, data):
    said = []
    settings = dict(
        model=str(base), data=str(data), output_dir=str(tmp_path), batch_size=2, model_max_length=48
    )
    settings.update(QUIET, precision="fp16", max_steps=6, lr=3e-3)
    result = finetune(FinetuneConfig(**settings), say=said.append)
    assert "loss scaling" in result.precision and "Warning" in result.precision
    finite = [x for x in result.losses if np.isfinite(x)]
    assert finite and finite[-1] < finite[0]  # it learns; overflow steps (if any) are skipped, not fatal
    assert all(np.isfinite(t).all() for t in load_model(tmp_path).state_dict().values())
