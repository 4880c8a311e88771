#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine that reaches no package registry: run this where pip reaches
# PyPI, in the repository, then carry .whl/ with the working tree (the device tool's `carry: [".whl"]`).
#
#   bash benchmarks/gpu_wheels.sh
#
# What the GPU image lacks for the check (its package list: /work/.library/device/KINDS.md): the server and the
# `openai` client with their dependencies, sentencepiece 0.2.3 (the image has 0.2.2, which our tokenizer cannot
# use), DeepSpeed (published as source only: installed without building ops) and bitsandbytes. The versions are
# this machine's, which the tests ran with; CPython 3.12 on x86-64 manylinux, as on the GPU image. vLLM does not
# fit: its wheel alone is larger than the 64 MiB a call may carry, so vLLM is measured only where the machine can
# install it itself. The total is printed; over 60 MiB, the largest (bitsandbytes) is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
mkdir -p .whl
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
version() { "$PYTHON" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in sentencepiece fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn \
           openai jiter distro sniffio hjson bitsandbytes; do
    v="$(version "$pkg")"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$pkg${v:+==$v}"
done
v="$(version deepspeed)"
"$PYTHON" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d .whl "deepspeed${v:+==$v}"
if [ "$(du -sm .whl | cut -f1)" -gt 60 ]; then
    echo "over 60 MiB: leaving bitsandbytes out"
    rm -f .whl/bitsandbytes-*.whl
fi
du -sh .whl
ls -1 .whl
