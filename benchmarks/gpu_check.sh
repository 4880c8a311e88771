#!/usr/bin/env bash
# The GPU check of issue 16 in one script: every CUDA path run for real and measured, in <= 10 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh RESULTS              # on the GPU machine
#   bash benchmarks/gpu_check.sh --rehearse RESULTS   # on a CPU: the same file, GPU lines "unmeasured (no CUDA)"
#   GPU_REPORT_ONLY=env,cuda_tests bash benchmarks/gpu_check.sh RESULTS   # only these report sections (and DeepSpeed)
#
# 1. Python is $PYTHON (default python3). Without the project installed, `baichuan` is made importable
#    (PYTHONPATH) and runnable (a Python shim on PATH, which the deepspeed launcher can run too).
# 2. Missing packages come from wheels in .whl/ (benchmarks/gpu_wheels.sh downloads them where pip reaches PyPI;
#    carry .whl to a machine that reaches nothing), else from the registry when it answers (60 s each, binary
#    wheels only, never a build from source; vLLM into a folder of its own, as it pins its own torch).
# 3. benchmarks/gpu_report.py RESULTS: pytest -m cuda, bandwidth, layers, decode bf16/int8/int4 beside the HBM
#    roofline, memory beside the published table, training MFU, the vLLM handoff; each section time-boxed
#    (330 s in all), a section that fails or runs out of time writes "not measured: <reason>" on its lines.
# 4. The DeepSpeed ZeRO-2/3 check (benchmarks/gpu_check_deepspeed.sh cuda), time-boxed at 210 s (on an H200 its six
#    runs took 10-26 s each, about 150 s with the data: 150 s cut the last one off); its verdict is
#    appended to RESULTS as the line deepspeed.zero. The rehearsal leaves it out (minutes of DeepSpeed on a CPU;
#    rehearse it alone with `bash benchmarks/gpu_check_deepspeed.sh cpu`).
set -uo pipefail

REHEARSE=0
if [ "${1:-}" = --rehearse ]; then REHEARSE=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: bash benchmarks/gpu_check.sh [--rehearse] RESULTS"; exit 2; fi
RESULTS="$(realpath -m "$1")"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
REPO="$(pwd)"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
START=$(date +%s)
say() { echo "[$(( $(date +%s) - START ))s] $*"; }

# --- 1. the project, importable and runnable ---
# Asked from outside the repository: `python -c` finds the package in the working directory, a script (the shim
# below, the deepspeed launcher's workers) does not.
if ! (cd / && "$PYTHON" -c "import baichuan") 2>/dev/null; then export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"; fi
if ! command -v baichuan >/dev/null; then
    mkdir -p "$WORK/bin"
    printf '#!%s\nimport sys\nfrom baichuan.cli import main\nsys.exit(main())\n' "$(command -v "$PYTHON")" > "$WORK/bin/baichuan"
    chmod +x "$WORK/bin/baichuan"
    export PATH="$WORK/bin:$PATH"
fi

# --- 2. packages ---
if [ "$REHEARSE" = 0 ]; then
    if compgen -G ".whl/*.whl" >/dev/null || compgen -G ".whl/*.tar.gz" >/dev/null; then
        say "installing the carried wheels in .whl/"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
            && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$WORK/site/bin:$PATH"
        # deepspeed is published as source only: a pure-Python install, no ops built. A target of its own, since pip
        # skips a --target's bin/ that the wheels made (and with it the `deepspeed` launcher).
        for sdist in .whl/*.tar.gz; do
            [ -e "$sdist" ] || continue
            DS_BUILD_OPS=0 "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target "$WORK/sdist-site" "$sdist" \
                && export PYTHONPATH="$WORK/sdist-site:$PYTHONPATH" PATH="$WORK/sdist-site/bin:$PATH" \
                || say "could not install $sdist"
        done
    fi
    if timeout 15 "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$WORK/probe" hjson >/dev/null 2>&1; then
        for pkg in bitsandbytes openai fastapi uvicorn deepspeed; do
            "$PYTHON" -c "import $pkg" 2>/dev/null && continue
            say "pip install $pkg"
            timeout 60 "$PYTHON" -m pip install -q --prefer-binary "$pkg" || say "could not install $pkg"
        done
        if ! "$PYTHON" -c "import vllm" 2>/dev/null; then
            say "pip install vllm (into $WORK/vllm-site)"
            timeout 150 "$PYTHON" -m pip install -q --only-binary=:all: --target "$WORK/vllm-site" vllm \
                && VLLM_SITE="$WORK/vllm-site" || say "could not install vllm"
        fi
        if ! "$PYTHON" -c "import flash_attn" 2>/dev/null; then  # a wheel or nothing: never a build
            timeout 60 "$PYTHON" -m pip install -q --only-binary=:all: flash-attn || say "no flash-attn wheel"
        fi
    else
        say "the package registry does not answer: only what is installed or carried in .whl/ is used"
    fi
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name())" \
        || { echo "no CUDA device: use --rehearse"; exit 1; }
fi

# --- 3. the measurements ---
say "benchmarks/gpu_report.py"
REPORT_FLAGS=()
VLLM_SITE="${VLLM_SITE:-}"
[ -n "$VLLM_SITE" ] && REPORT_FLAGS+=(--vllm-site "$VLLM_SITE")
[ "$REHEARSE" = 1 ] && REPORT_FLAGS+=(--rehearse)
[ -n "${GPU_REPORT_ONLY:-}" ] && REPORT_FLAGS+=(--only "$GPU_REPORT_ONLY")
"$PYTHON" benchmarks/gpu_report.py "$RESULTS" "${REPORT_FLAGS[@]}" --budget-s 330
if [ ! -f "$RESULTS" ]; then echo "gpu_report.py wrote no results file"; exit 1; fi

# --- 4. DeepSpeed ZeRO-2/3 ---
if [ "$REHEARSE" = 1 ]; then
    echo "deepspeed.zero: unmeasured (no CUDA); left out of the rehearsal: bash benchmarks/gpu_check_deepspeed.sh cpu rehearses it" >> "$RESULTS"
elif ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
    echo "deepspeed.zero: not measured: deepspeed is not installed (carry it in .whl/: benchmarks/gpu_wheels.sh)" >> "$RESULTS"
else
    say "benchmarks/gpu_check_deepspeed.sh cuda"
    timeout 210 bash benchmarks/gpu_check_deepspeed.sh cuda "$WORK/deepspeed" > "$WORK/deepspeed.log" 2>&1
    status=$?
    verdict="$(grep -E '^(ALL PASSED|FAILED)' "$WORK/deepspeed.log" | tail -1)"
    checks="$(grep -cE '^ok ' "$WORK/deepspeed.log")"
    if [ $status = 124 ]; then verdict="not measured: ran past 210 s ($checks checks passed by then)"; fi
    echo "deepspeed.zero: ${verdict:-not measured: exit status $status, see the log} (exit $status; ZeRO-2/3 fp32 losses and weights == no DeepSpeed, ZeRO-3 resume, bf16 runs)" >> "$RESULTS"
    tail -15 "$WORK/deepspeed.log"
fi
say "done"
cat "$RESULTS"
