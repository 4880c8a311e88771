"""A GGUF import streams: its peak memory is about one tensor, never the file nor two tensors. Measured as the
peak resident memory (VmHWM) of a child process that imports a model made of two big tensors (embeddings and
head, 64 MiB each in fp32) and small layers, above what it held before; a map of the file, or a tensor kept
while the next is made, would each add a whole tensor or more."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from baichuan.config import ROPE, Config
from baichuan.convert.gguf import export_gguf
from baichuan.scaffold import init_checkpoint
from tests.conftest import skip_platform

pytest.importorskip("gguf")

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from baichuan.convert.gguf import import_gguf

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    warm, big, out = map(Path, sys.argv[1:])
    import_gguf(warm, out / "warm")  # every code path once: lazy imports, first allocations
    Path("/proc/self/clear_refs").write_text("5")  # the peak so far is forgotten (Linux 4.0+)
    baseline = status("VmRSS")
    if status("VmHWM") > baseline + 2**20:
        sys.exit("could not reset the peak")
    import_gguf(big, out / "big")
    print(status("VmHWM") - baseline)
    """
)


def test_import_holds_one_tensor_at_a_time(tmp_path, tokenizer_file):
    if not Path("/proc/self/clear_refs").exists():
        skip_platform("the peak resident memory is read from Linux's /proc")
    shapes = dict(n_layers=2, n_heads=4, position=ROPE, max_seq_len=128)
    big_config = Config(vocab_size=65_536, dim=256, ffn_dim=512, **shapes)
    paths = {}
    for name, config in (
        ("warm", Config(vocab_size=4096, dim=64, ffn_dim=128, **shapes)),
        ("big", big_config),
    ):
        model = init_checkpoint(config, tmp_path / name, torch.float32, tokenizer=tokenizer_file)
        paths[name] = export_gguf(model, tmp_path / f"{name}.gguf", "f32", exact=False)
    largest = big_config.vocab_size * big_config.dim * 4  # the embeddings, and the head
    assert paths["big"].stat().st_size > 2 * largest

    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(paths["warm"]), str(paths["big"]), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if "could not reset the peak" in run.stderr:
        skip_platform("this kernel does not reset the peak resident memory (/proc/self/clear_refs)")
    assert run.returncode == 0, run.stderr
    growth = int(run.stdout.strip().splitlines()[-1])
    assert growth < 1.5 * largest, f"peak {growth / 2**20:.0f} MiB above the baseline; one tensor is 64 MiB"

    # and what it wrote is the model, exactly (fp32 in, fp32 out)
    with (
        safe_open(str(tmp_path / "big" / "model.safetensors"), "pt") as source,
        safe_open(str(tmp_path / "out" / "big" / "model.safetensors"), "pt") as imported,
    ):
        assert set(imported.keys()) == set(source.keys())
        for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.W_pack.weight", "lm_head.weight"):
            assert torch.equal(imported.get_tensor(name), source.get_tensor(name))
