"""Device selection, done once per process and cached.

Order: ``ABLITERATE_DEVICE`` if set (e.g. ``cpu``, ``cuda``, ``cuda:1``, ``mps``), else CUDA, else MPS,
else CPU. ``CUDA_VISIBLE_DEVICES`` is honoured by CUDA itself (an empty value hides every GPU). Study
workers on a machine with several GPUs take one each (:func:`use_worker_gpu`).
"""

from __future__ import annotations

import functools
import gc
import logging
import os

import psutil
import torch

log = logging.getLogger(__name__)

ENV_VAR = "ABLITERATE_DEVICE"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@functools.cache
def get_device() -> torch.device:
    """The device every model and tensor of this process lives on (by default)."""
    requested = os.environ.get(ENV_VAR, "").strip()
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{ENV_VAR}={requested} but CUDA is not available on this machine")
        if device.type == "mps" and not _mps_available():
            raise RuntimeError(f"{ENV_VAR}={requested} but MPS is not available on this machine")
        log.info("device %s (from %s)", device, ENV_VAR)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        log.info("device cuda (CUDA available)")
    elif _mps_available():
        device = torch.device("mps")
        log.info("device mps (Apple GPU available, no CUDA)")
    else:
        device = torch.device("cpu")
        log.info("device cpu (no CUDA or MPS found), %d threads", torch.get_num_threads())
    log_gpus()
    return device


def use_worker_gpu(worker: int) -> torch.device | None:
    """Put study worker ``worker`` on GPU ``worker mod n`` of a machine with n > 1 visible GPUs.

    Several workers on one machine (``study.workers`` with ``--resources gpu=N``) would otherwise all
    land on GPU 0. A job that sees one GPU (a SLURM job given its own) and an explicit
    ``ABLITERATE_DEVICE`` are left alone. Call it before :func:`get_device`, in the worker's process.
    """
    if os.environ.get(ENV_VAR, "").strip() or not torch.cuda.is_available():
        return None
    n = torch.cuda.device_count()
    if n < 2:
        return None
    index = worker % n
    torch.cuda.set_device(index)  # tensors created on plain "cuda" go there too
    os.environ[ENV_VAR] = f"cuda:{index}"
    get_device.cache_clear()
    log.info("study worker %d on GPU %d of %d", worker, index, n)
    return torch.device("cuda", index)


def log_gpus() -> list[dict]:
    """Log every visible GPU with its name and memory; return them as dicts."""
    found: list[dict] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gib = props.total_memory / 2**30
            found.append({"index": i, "name": props.name, "memory_gib": round(gib, 1)})
            log.info("GPU %d: %s, %.1f GiB", i, props.name, gib)
    elif _mps_available():
        found.append({"index": 0, "name": "Apple MPS", "memory_gib": None})
        log.info("GPU 0: Apple MPS (unified memory)")
    else:
        log.info("no GPU found")
    return found


def free_memory() -> None:
    """Collect garbage and return cached accelerator memory after a model was dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _mps_available() and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so timings measure work rather than launches."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def free_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take: free GPU memory plus what PyTorch's caching
    allocator holds unused, or the RAM available on the CPU; None where it is not known (MPS)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return psutil.virtual_memory().available
    return None


def fork_rng(device: torch.device):
    """A context that restores the global RNG state of ``device`` (and the CPU's) on exit, so a seeded
    draw inside it leaves the caller's random stream untouched."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def host_to(values: list[float], device: torch.device) -> torch.Tensor:
    """A float32 tensor of Python numbers on ``device``; to a GPU through pinned memory, so the copy is
    queued behind the work already there instead of waiting for it (a pageable copy syncs the stream)."""
    host = torch.tensor(values, dtype=torch.float32, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)
