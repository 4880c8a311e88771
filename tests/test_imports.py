"""The import direction of STYLE.md: a lower layer never imports a higher one, and only the application layer
(and the transformers face) may import transformers, fastapi, gradio or deepspeed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "baichuan"

LAYERS = {
    "config": 0,
    "cpu": 0,
    "cpu_gemv": 0,
    "native_bpe": 0,  # the C++ BPE encoder's loader: standard library only
    "position": 1,
    "kv_cache": 1,
    "memory": 1,
    "hugepages": 1,  # weights on transparent huge pages: torch and the standard library
    "tokenizer": 1,
    "quant": 1,  # quant/*: knows only nn.Linear; checkpoint loads through its transform hook
    "lora": 1,
    "model": 2,
    "checkpoint": 3,
    "convert": 3,
    "generate": 3,
    "chat_format": 3,
    "data": 3,
    "scaffold": 4,  # `init`: writes a checkpoint with a tokenizer trained by train/tokenizer
    "runtime": 3,
    "chat": 4,
    "webui": 4,
    "hf": 4,
    "serve": 4,
    "train": 4,
    "eval": 4,
    "cli": 5,
}
# Same-layer imports that are part of the design.
ALLOWED_ACROSS = {
    ("cpu_gemv", "cpu"),  # the kernel loader asks the CPU probes
    ("quant", "memory"),  # a quantizing load hands its temporaries' pages back (memory.return_free_memory)
    ("hugepages", "memory"),  # moving weights onto huge pages hands back the pages they leave
    ("generate", "chat_format"),
    ("scaffold", "train"),  # init trains its tokenizer with the one trainer
    ("runtime", "checkpoint"),
    ("runtime", "generate"),
    ("runtime", "chat_format"),
    ("convert", "checkpoint"),  # conversions read and write checkpoints with the one loader and commit
    ("convert", "chat_format"),  # the GGUF export embeds the chat template
}
HEAVY = ("transformers", "fastapi", "gradio", "deepspeed", "lm_eval")


def top_module(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def baichuan_imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "baichuan":  # from baichuan import cpu_gemv
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("baichuan."):
            yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("baichuan."):
                    yield alias.name.split(".")[1]


def sources():
    return [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE]


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_imports(path):
    here = top_module(path)
    assert here in LAYERS, f"{here} has no layer in this test; add it"
    for target in baichuan_imports(path):
        if target == here:
            continue
        assert target in LAYERS, f"{path.name} imports unknown module baichuan.{target}"
        lower = LAYERS[target] < LAYERS[here]
        assert lower or (here, target) in ALLOWED_ACROSS, f"{here} (layer {LAYERS[here]}) imports {target}"


def test_core_layers_import_without_heavy_packages():
    core = [m for m, layer in LAYERS.items() if layer <= 3 and (PACKAGE / f"{m}.py").exists()]
    blocker = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in HEAVY)
    code = blocker + "".join(f"import baichuan.{m}\n" for m in core) + "print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
