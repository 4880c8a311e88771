#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine that reaches no package registry: run this where pip reaches
# PyPI, in the repository, then carry .whl/ with the working tree (the device tool's `carry: [".whl"]`).
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_wheels.sh   # a Python with the project's test extra installed
#
# What the GPU image lacks for the check (its package list: /work/.library/device/KINDS.md): the server and the
# `openai` client with their dependencies, sentencepiece 0.2.3 (the image has 0.2.2, which our tokenizer cannot
# use), DeepSpeed (published as source only: installed without building ops) and bitsandbytes (41 MB), with what
# they need. The versions are this machine's, which the tests ran with; CPython 3.12 on x86-64 manylinux, as on the
# GPU image. About 51 MB in all (2026-11-30). vLLM does not fit: its wheel alone is larger than the 64 MiB a call
# may carry, so vLLM is measured only where the machine can install it itself. Over 60 MiB, bitsandbytes is left
# out.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
mkdir -p .whl
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
# The GPU image's packages as listed in /work/.library/device/KINDS.md (2026-11-17), sentencepiece left out (its
# 0.2.2 is too old): not downloaded.
IMAGE="
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"
# The roots and everything they need, as installed here (importlib.metadata), minus the image's packages.
NEEDED="$("$PYTHON" - $IMAGE <<'PY'
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution

image = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[1:]}
roots = ["openai", "fastapi", "uvicorn", "sentencepiece", "bitsandbytes", "deepspeed"]
absent = []
for root in roots:
    try:
        distribution(root)
    except PackageNotFoundError:
        absent.append(root)
if absent:  # their dependencies are read from what is installed here: without the roots, none would come
    sys.exit(f"{sys.executable} lacks {', '.join(absent)}: run this with the Python the project's test extra is "
             "installed in (PYTHON=.venv/bin/python bash benchmarks/gpu_wheels.sh)")
todo, seen = list(roots), {}
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen or name in image:
        continue
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        seen[name] = ""
        continue
    seen[name] = dist.version
    for req in dist.requires or []:
        if "extra ==" not in req:
            todo.append(re.match(r"[A-Za-z0-9_.-]+", req).group(0))
print(" ".join(f"{n}=={v}" if v else n for n, v in sorted(seen.items())))
PY
)" || exit 1
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in $NEEDED; do
    case "$spec" in
        deepspeed*)  # source only on PyPI; its metadata is built in an isolated environment (needs `wheel`)
            "$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d .whl "$spec" ;;
        *)
            "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                "${PLATFORMS[@]}" -d .whl "$spec" ;;
    esac || echo "could not download $spec"
done
if [ "$(du -sm .whl | cut -f1)" -gt 60 ]; then
    echo "over 60 MiB: leaving bitsandbytes out"
    rm -f .whl/bitsandbytes-*.whl
fi
du -sh .whl
ls -1 .whl
