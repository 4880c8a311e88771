#!/usr/bin/env bash
# The DeepSpeed part of benchmarks/gpu_check.sh (rehearsed on CPU with `benchmarks/gpu_check_deepspeed.sh cpu`).
#
#   benchmarks/gpu_check_deepspeed.sh [cuda|cpu] [OUT]
#
# DeepSpeed ZeRO-2/3 under `baichuan pretrain`, launched as the README launches it
# (`deepspeed --num_gpus 1 $(which baichuan) pretrain --deepspeed configs/deepspeed/zero2.json ...`), on a tiny
# Baichuan2-shaped model for a few steps:
#   1. fp32: ZeRO-2 and ZeRO-3 give the losses of the run without DeepSpeed (rtol 1e-4), and the same final
#      official-layout weights (rtol 1e-3, atol 1e-4);
#   2. ZeRO-3 resumed from its step-4 checkpoint gives the same steps 5-6;
#   3. bf16 (the shipped configs' "auto" on a GPU that computes bf16): ZeRO-2 and ZeRO-3 run, finite losses
#      within 5% of fp32 after 6 steps.
# Needs: the project installed with its [deepspeed] extra in the active Python (pip install -e '.[deepspeed]').
# Nothing is downloaded: the tokenizer and the text are the ones `baichuan init` builds in.
# Prints one line per check and "ALL PASSED" or the failures; exit status 0 only when all passed.
set -euo pipefail

DEVICE="${1:-cuda}"
OUT="${2:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
PYTHON="${PYTHON:-python}"
BAICHUAN="$(command -v baichuan || true)"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ -z "$BAICHUAN" ]; then echo "baichuan is not on PATH: pip install -e '.[deepspeed]'"; exit 1; fi
"$PYTHON" -c "import deepspeed" 2>/dev/null || { echo "deepspeed is not installed: pip install -e '.[deepspeed]'"; exit 1; }
if [ "$DEVICE" = cuda ]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name())"
fi
"$PYTHON" -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"

echo "== data: the built-in tokenizer and text =="
"$PYTHON" - "$OUT" <<'EOF'
import sys
from pathlib import Path
from baichuan.scaffold import sample_text, tokenizer_model
from baichuan.train.data import prepare_data
from baichuan.train.tokenizer import tokenizer_files

out = Path(sys.argv[1])
(out / "tok").mkdir(exist_ok=True)
for name, content in tokenizer_files(tokenizer_model()).items():
    (out / "tok" / name).write_bytes(content)
(out / "text").mkdir(exist_ok=True)
lines = (line.replace("\n", " ") for line in sample_text(4000, seed=1))
(out / "text" / "sample.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
report = prepare_data([out / "text"], out / "tok", out / "data", workers=1)
print(f"{report.tokens:,} tokens")
EOF

COMMON=(pretrain --preset baichuan2-7b --layers 4 --hidden 256 --heads 4 --ffn 688 --seq-len 128 --batch-size 8
        --max-steps 6 --lr 1e-3 --warmup-steps 2 --seed 1 --save-every 2 --keep-last 0 --log-every 1
        --no-progress --no-tensorboard --no-plot --device "$DEVICE" --data "$OUT/data" --tokenizer "$OUT/tok")
PORT=29641
run_ds() {  # run_ds NAME CONFIG [flags...]: one process under the deepspeed launcher
    local name="$1" config="$2"; shift 2
    PORT=$((PORT + 1))
    deepspeed --num_gpus 1 --master_port "$PORT" "$BAICHUAN" "${COMMON[@]}" --deepspeed "$config" \
        --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 || { echo "FAILED: $name (see $OUT/$name.log)"; tail -20 "$OUT/$name.log"; }
}

echo "== runs =="
time "$BAICHUAN" "${COMMON[@]}" --precision fp32 --out "$OUT/plain" > "$OUT/plain.log" 2>&1 \
    || { echo "FAILED: plain, the run without DeepSpeed (see $OUT/plain.log)"; tail -20 "$OUT/plain.log"; exit 1; }
time run_ds z2 configs/deepspeed/zero2.json --precision fp32
time run_ds z3 configs/deepspeed/zero3.json --precision fp32
# Resume: a copy of the ZeRO-3 run without its step-6 checkpoint, continued from step 4.
rm -rf "$OUT/z3cut" && cp -r "$OUT/z3" "$OUT/z3cut" && rm -rf "$OUT/z3cut/checkpoints/step-00000006"
time run_ds z3cut configs/deepspeed/zero3.json --precision fp32 --resume
time run_ds z2bf16 configs/deepspeed/zero2.json --precision bf16
time run_ds z3bf16 configs/deepspeed/zero3.json --precision bf16

echo "== checks =="
"$PYTHON" - "$OUT" <<'EOF'
import csv, sys
from pathlib import Path
import numpy as np
from baichuan.checkpoint import load_model

out = Path(sys.argv[1])
failures = []


def losses(name):
    path = out / name / "loss.csv"
    if not path.is_file():
        failures.append(f"{name}: no loss.csv (see {out / name}.log)")
        return None
    with open(path, newline="") as f:
        return np.array([float(r["loss"]) for r in csv.DictReader(f)])


def check(what, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")
    if not ok:
        failures.append(what)


plain = losses("plain")
for name in ("z2", "z3", "z3cut", "z2bf16", "z3bf16"):
    got = losses(name)
    if plain is None or got is None:
        continue
    if name.endswith("bf16"):
        ok = len(got) == 6 and np.isfinite(got).all() and abs(got[-1] - plain[-1]) / plain[-1] < 0.05
        check(f"{name} runs in bf16", ok, f"losses {np.round(got, 4).tolist()} vs fp32 {np.round(plain, 4).tolist()}")
        continue
    ok = len(got) == len(plain) and np.allclose(got, plain, rtol=1e-4)
    check(f"{name} losses == without DeepSpeed", ok, f"max rel diff {np.max(np.abs(got - plain) / plain):.2e}")
    a = load_model(out / "plain" / "checkpoints" / "step-00000006").state_dict()
    b = load_model(out / name / "checkpoints" / "step-00000006").state_dict()
    # Adam moves weights near zero by ~lr whatever the gradient's size: compare to an absolute floor too.
    ok = all(np.allclose(b[k].numpy(), a[k].numpy(), rtol=1e-3, atol=1e-4) for k in a)
    worst = max(float(np.max(np.abs(a[k].numpy() - b[k].numpy()))) for k in a)
    check(f"{name} final weights == without DeepSpeed", ok, f"max abs diff {worst:.2e}")
print("ALL PASSED" if not failures else f"FAILED: {', '.join(failures)}")
sys.exit(1 if failures else 0)
EOF
