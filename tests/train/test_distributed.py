"""The process group a training run lives in (`baichuan.train.distributed`): what it creates it destroys, on a
clean finish and after an error, and a group someone else created is left alone."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from baichuan.train.distributed import Ranks, launcher_ranks, process_group, training_device

CPU = torch.device("cpu")


def test_one_process_without_deepspeed_needs_no_group():
    with process_group(CPU, world=1, deepspeed=False):
        assert not dist.is_initialized()


def test_deepspeed_alone_gets_a_group_of_one_and_it_is_destroyed():
    with process_group(CPU, world=1, deepspeed=True):
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    assert not dist.is_initialized()


def test_an_error_inside_destroys_a_group_of_one_and_propagates():
    with pytest.raises(RuntimeError, match="boom"), process_group(CPU, world=1, deepspeed=True):
        raise RuntimeError("boom")
    assert not dist.is_initialized()


def test_a_group_created_elsewhere_is_left_alone():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with process_group(CPU, world=1, deepspeed=True):
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_launcher_ranks_and_devices(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_ranks() == Ranks(1, 0, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launcher_ranks() == Ranks(4, 3, 1)
    assert training_device("cuda", 1) == torch.device("cuda", 1)  # a bare "cuda" is this rank's GPU
    assert training_device("cuda:0", 1) == torch.device("cuda", 0)
    assert training_device("cpu", 1) == CPU
    if not torch.cuda.is_available():
        assert training_device("auto", 1) == CPU
