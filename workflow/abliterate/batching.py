"""Pick the batch size: the largest that fits on a CUDA GPU, a fixed default elsewhere.

On CUDA the size is found by doubling until ``torch.OutOfMemoryError`` and cached in a JSON file
per model key and GPU model, so later jobs on the same kind of GPU skip the probe. The probe must
run the worst case the real work will meet (longest prompts, full token budget), because the
chosen size is used without a safety margin.

On CPU and MPS there is no reliable out-of-memory signal (MPS shares system memory and the CPU
swaps), so ``NON_CUDA_DEFAULT`` is used without probing. It is large because a decoding step
reads every weight once whatever the batch: on a CPU the step is bound by memory bandwidth, and
two batches of 16 cost nearly twice one batch of 32 (benchmarks/README.md, "Figures from the code").
Prompt prefill is compute-bound and indifferent to the batch size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .devices import free_memory
from .errors import ConfigError
from .io import read_json, write_json

log = logging.getLogger(__name__)

NON_CUDA_DEFAULT = 64


def _device_id(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return f"{props.name}|{props.total_memory // 2**20}MiB"


def _fits(fn_probe: Callable[[int], Any], size: int) -> bool:
    try:
        fn_probe(size)
        return True
    except torch.OutOfMemoryError:
        pass
    # outside the except block, so the traceback (and the tensors its frames hold) is released
    free_memory()
    return False


def _read_cache(path: Path) -> dict:
    try:
        return read_json(path) if path.exists() else {}
    except (OSError, ValueError):
        log.warning("ignoring unreadable batch size cache %s", path)
        return {}


def auto_batch_size(fn_probe: Callable[[int], Any], device: torch.device | str, key: str,
                    cache_path: str | os.PathLike, start: int = 1, max_size: int = 256) -> int:
    """Largest batch size in ``start · 2^k`` (capped at ``max_size``) for which ``fn_probe(size)`` fits.

    ``key`` names the model and workload (e.g. ``"llama3-8b|generate|128"``); the cache entry is
    ``key`` plus the GPU model and memory. A cached size is reused unless it was capped by a smaller
    ``max_size`` than asked for now.
    """
    if start < 1 or max_size < start:
        raise ConfigError(f"batch size search needs 1 <= start <= max_size, got {start}, {max_size}")
    device = torch.device(device)
    if device.type != "cuda":
        size = max(start, min(NON_CUDA_DEFAULT, max_size))
        log.info("batch size %d on %s (fixed default, no out-of-memory probe off CUDA)", size, device.type)
        return size

    path = Path(cache_path)
    entry_key = f"{key}|{_device_id(device)}"
    cache = _read_cache(path)
    entry = cache.get(entry_key)
    if entry and (entry["batch_size"] < entry["max_size"] or max_size <= entry["max_size"]):
        size = min(entry["batch_size"], max_size)
        log.info("batch size %d for %s (cached in %s)", size, entry_key, path)
        return size

    best = None
    size = start
    while True:
        if not _fits(fn_probe, size):
            log.info("batch size %d does not fit on %s", size, device)
            break
        best = size
        log.info("batch size %d fits on %s", size, device)
        if size >= max_size:
            break
        size = min(size * 2, max_size)
    free_memory()
    if best is None:
        raise ConfigError(f"even a batch of {start} runs out of GPU memory for {key}; use a smaller model, "
                          "quantization (`model.quantization`) or fewer `max_new_tokens`")
    cache = _read_cache(path)  # re-read: another job may have added entries meanwhile
    cache[entry_key] = {"batch_size": best, "max_size": max_size}
    write_json(cache, path)
    log.info("batch size %d for %s (probed, cached in %s)", best, entry_key, path)
    return best
