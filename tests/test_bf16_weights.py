"""fp32 activations over bf16 weights: a bf16 checkpoint run with `--dtype auto` on a CPU that emulates bf16
(checkpoint.load_into's bf16_weights, runtime.keeps_bf16_weights)."""

import pytest

from tests.conftest import require_cpu_kernels, run_with_avx2


@pytest.mark.parametrize("norm_head", [False, True])
def test_bf16_weights_give_the_fp32_weights_logits_at_half_the_bytes(tmp_path, norm_head):
    """Loaded in fp32 with bf16_weights, a bf16 checkpoint keeps every linear layer's weight in bf16 (the
    NormHead folded, its rows normalised and rounded to bf16 as a bf16 model's) and the rest in fp32. Its logits
    are those of fp32 weights holding the same values, for a prompt and for a decoded token; decode steps run the
    fused layer; the runtime's memory estimate counts the bytes exactly."""
    require_cpu_kernels()
    code = f"""
import torch
from baichuan import checkpoint, model as core, runtime
from baichuan.kv_cache import KVCache
from baichuan.model import Baichuan, Linear
from tests.conftest import tiny_config

directory = {str(tmp_path)!r}
torch.manual_seed(0)
source = Baichuan(tiny_config("rope", {norm_head})).eval()
source.init_weights()
checkpoint.save_model(source.bfloat16(), directory)

kept = checkpoint.load_model(directory, torch.float32, bf16_weights=True)
reference = checkpoint.fold_norm_head(checkpoint.load_model(directory, torch.float32))
with torch.no_grad():  # the head's normalised rows rounded to bf16, as kept holds them
    reference.lm_head.weight.copy_(reference.lm_head.weight.bfloat16().float())
linears = {{n for n, m in kept.named_modules() if type(m) is Linear}}
assert "lm_head" in linears and len(linears) == 1 + 5 * kept.config.n_layers
for name, tensor in kept.state_dict().items():
    expected = torch.bfloat16 if name.removesuffix(".weight") in linears else torch.float32
    assert tensor.dtype == expected, (name, tensor.dtype)
assert torch.equal(kept.lm_head.weight.float(), reference.lm_head.weight)

rel = lambda a, b: ((a - b).norm() / b.norm()).item()
ids = torch.randint(0, kept.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
with torch.inference_mode():
    worst = rel(kept(ids), reference(ids))
    assert all(core._fused_layer(layer, 2, torch.float32) is not None for layer in kept.model.layers)
    caches = [KVCache.for_model(m.config, 2, 16, torch.float32) for m in (kept, reference)]
    for m, c in zip((kept, reference), caches):
        m(ids, 0, c)
    step = [m(ids[:, :1], 9, c) for m, c in zip((kept, reference), caches)]
    worst = max(worst, rel(step[0], step[1]))
    assert step[0].dtype == torch.float32

prepared = runtime.Prepared(
    directory, kept.config, torch.device("cpu"), torch.float32, torch.float32, None, None,
    torch.bfloat16, None, None, None, False, "", bf16_weights=True,
)  # what runtime.prepare gives, without the tokenizer it reads
measured = sum(t.nbytes for t in kept.state_dict().values())
assert prepared.estimate(1, 16, 16).weights == measured, (prepared.estimate(1, 16, 16).weights, measured)
print(worst < 1e-5)
"""
    assert run_with_avx2(code) == ["True"]


def test_auto_keeps_a_bf16_checkpoint_in_bf16_where_the_cpu_emulates_it(tmp_path):
    """runtime.prepare with dtype auto, where it picks fp32 and our mat-vec widens bf16 (forced here): a bf16
    checkpoint loads with bf16_weights and says so; an explicit fp32, an fp32 checkpoint and one quantized on load
    do not."""
    require_cpu_kernels()
    code = f"""
import torch
from baichuan import runtime
from baichuan.scaffold import init_checkpoint
from tests.conftest import tiny_config

runtime.half_is_emulated = lambda dtype: True  # auto picks fp32, as on a CPU without native bf16
config = tiny_config("rope", True).replace(vocab_size=4096)
bf16 = init_checkpoint(config, {str(tmp_path / "bf16")!r}, torch.bfloat16)
fp32 = init_checkpoint(config, {str(tmp_path / "fp32")!r}, torch.float32)
auto = runtime.prepare(bf16, "cpu", "auto")
assert auto.dtype == torch.float32 and auto.bf16_weights, auto
assert "fp32 activations over the bf16 weights" in auto.note, auto.note
model = runtime.load(auto).model
assert model.lm_head.weight.dtype == torch.bfloat16
assert model.model.layers[0].self_attn.W_pack.weight.dtype == torch.bfloat16
assert model.model.embed_tokens.weight.dtype == torch.float32
for other in (runtime.prepare(bf16, "cpu", "fp32"), runtime.prepare(fp32, "cpu", "auto"),
              runtime.prepare(bf16, "cpu", "auto", quantize=8)):
    assert not other.bf16_weights, other
    assert runtime.load(other).model.model.layers[0].self_attn.W_pack.weight.dtype != torch.bfloat16
print("ok")
"""
    assert run_with_avx2(code) == ["ok"]
