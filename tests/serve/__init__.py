"""Helpers shared by the server tests: one tiny checkpoint per test run, and a real uvicorn on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# Small enough that any request the schema allows finishes in well under a second.
TINY = dict(n_layers=2, dim=64, n_heads=4, ffn_dim=128, vocab_size=4096, max_seq_len=256)


def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Baichuan2 checkpoint (trained tokenizer, Chat generation_config.json), made once per run."""
    from baichuan.config import preset
    from baichuan.scaffold import init_checkpoint

    directory = tmp_path_factory.getbasetemp() / "serve-tiny-checkpoint"
    done = directory / ".complete"
    if not done.exists():
        init_checkpoint(preset("baichuan2-7b").replace(**TINY), directory, dtype=torch.float32)
        done.touch()
    return directory


@contextmanager
def running_server(app, timeout: float = 20.0) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 and a free port in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
