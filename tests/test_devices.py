"""Device choice: the environment override, and one GPU per study worker on a multi-GPU machine
(tested on the CPU by making torch report GPUs; nothing is allocated on them)."""

from __future__ import annotations

import os
import types

import pytest
import torch
from abliterate import devices


@pytest.fixture()
def fake_gpus(monkeypatch):
    """torch reports ``n`` GPUs (set ``fake_gpus.n``); set_device calls are recorded."""

    fake = types.SimpleNamespace(n=4, chosen=[])

    # set (empty: no choice) rather than deleted, so the value use_worker_gpu writes is undone after
    monkeypatch.setenv(devices.ENV_VAR, "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.n)
    monkeypatch.setattr(torch.cuda, "set_device", fake.chosen.append)
    monkeypatch.setattr(devices, "log_gpus", list)
    devices.get_device.cache_clear()
    yield fake
    devices.get_device.cache_clear()


@pytest.mark.parametrize(("worker", "gpu"), [(0, 0), (1, 1), (3, 3), (4, 0), (6, 2)])
def test_each_worker_takes_gpu_worker_mod_n(fake_gpus, worker, gpu):
    assert devices.use_worker_gpu(worker) == torch.device("cuda", gpu)
    assert fake_gpus.chosen[-1] == gpu
    assert devices.get_device() == torch.device("cuda", gpu)


def test_one_visible_gpu_or_an_explicit_device_is_left_alone(fake_gpus, monkeypatch):
    fake_gpus.n = 1  # e.g. a SLURM job given its own GPU
    assert devices.use_worker_gpu(3) is None and not fake_gpus.chosen
    assert devices.get_device() == torch.device("cuda")

    fake_gpus.n = 4
    devices.get_device.cache_clear()
    monkeypatch.setenv(devices.ENV_VAR, "cuda:2")
    assert devices.use_worker_gpu(1) is None and not fake_gpus.chosen
    assert devices.get_device() == torch.device("cuda", 2)


def test_without_cuda_nothing_changes(monkeypatch):
    monkeypatch.setenv(devices.ENV_VAR, "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.use_worker_gpu(2) is None
    assert os.environ[devices.ENV_VAR] == ""
