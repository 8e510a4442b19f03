"""RAM a CPU job that holds a whole model needs, estimated from the model's config before any weight
is read and checked against the configured budget, so a job that cannot fit stops at once instead of
swapping for an hour."""

from __future__ import annotations

import logging

import psutil
import torch

from .errors import AbliterateError

log = logging.getLogger(__name__)
# share of the budget (or of the free RAM, when less) above which an estimate is logged as a warning
NEAR = 0.8


def parameter_numels(config) -> list[int]:
    """Element counts of the weights of a model built from ``config``, without allocating them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # tied embeddings are one tensor on disk and in RAM: count them once
    return [p.numel() for p in model.parameters()]


def parameter_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the weights of a model built from ``config`` in ``dtype``."""
    return sum(parameter_numels(config)) * _element_bytes(dtype)


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4


def gguf_conversion_bytes(config) -> int:
    """RAM to dequantise a GGUF model to float32: transformers first builds a dequantised state dict,
    then the model, so every weight is held twice, and the largest tensor (the embedding, usually)
    passes through temporaries on the way. Whole-process peaks measured against this estimate:
    SmolLM2-135M 1.17 GiB (1.21 estimated), Gemma 3 270M 3.20 GiB (3.25)."""
    numels = parameter_numels(config)
    return (2 * sum(numels) + 2 * max(numels)) * _element_bytes(torch.float32)


def check(needed: int, max_ram_gib: float, job: str, remedy: str) -> None:
    """Log the estimate; raise when it exceeds the budget ``max_ram_gib`` (``remedy``: what to do).
    A warning when it comes near the budget or what is free, so the job worth watching stands out."""
    budget = max_ram_gib * 2**30
    available = psutil.virtual_memory().available
    level = logging.WARNING if needed > NEAR * min(budget, available) else logging.INFO
    log.log(level, "%s needs about %.2f GiB of RAM (budget merge.max_ram_gib %.1f GiB, %.1f GiB available now)",
            job, needed / 2**30, max_ram_gib, available / 2**30)
    if needed > budget:
        raise AbliterateError(f"{job} needs about {needed / 2**30:.1f} GiB, more than merge.max_ram_gib "
                              f"({max_ram_gib} GiB); {remedy}")
    if needed > available:
        log.warning("less RAM is free (%.1f GiB) than %s needs: it may swap", available / 2**30, job)
