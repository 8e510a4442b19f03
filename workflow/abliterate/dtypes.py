"""The dtype cascade: which precision a model is loaded in, and why.

The config lists candidates in order (default ``[auto, float16, bfloat16, float32]``). Each is tried
until the model's probe forward gives finite logits:

* ``auto``     the dtype the checkpoint was saved in: no conversion cost, the precision its authors used.
* ``float16``  half the memory of float32 and fast on every GPU, but its small range (max 65504)
               overflows in some models (large activations, e.g. Gemma), giving Inf/NaN.
* ``bfloat16`` float32's range at half the memory; less mantissa than float16, and slow or missing
               on old GPUs, hence after float16.
* ``float32``  always works; twice the memory and slower. The last resort.

On the CPU, half precision is slow (no fast kernels on most CPUs) and overflows like anywhere else,
so half-precision candidates are skipped there unless the config sets ``model.cpu_half: true``.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DEFAULT_CASCADE = ("auto", "float16", "bfloat16", "float32")

NAMES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
         "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
         "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}

HALF = (torch.float16, torch.bfloat16)


def parse(name: str) -> torch.dtype | str:
    """``"auto"`` stays a string; every other name becomes a ``torch.dtype``."""
    if name == "auto":
        return "auto"
    try:
        return NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(sorted(NAMES))}") from None


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype a transformers config says its weights were saved in (None when unknown)."""
    # `torch_dtype` only where `dtype` is absent: transformers 5 warns on every read of the old name
    value = getattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in NAMES:
        return NAMES[value]
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        return checkpoint_dtype(text_config)
    return None


def candidates(cascade: list[str] | tuple[str, ...], device: torch.device, config=None,
               cpu_half: bool = False) -> list[tuple[torch.dtype, str]]:
    """Resolve the cascade for ``device`` into ``(dtype, reason)`` pairs, without duplicates."""
    out: list[tuple[torch.dtype, str]] = []
    for name in cascade:
        parsed = parse(name)
        if parsed == "auto":
            dtype = checkpoint_dtype(config) if config is not None else None
            if dtype is None:
                dtype, reason = torch.float32, "auto: the checkpoint names no dtype, so float32"
            else:
                reason = f"auto: the checkpoint was saved in {str(dtype).removeprefix('torch.')}"
        else:
            dtype, reason = parsed, f"{name} from the cascade"
        if device.type == "cpu" and dtype in HALF and not cpu_half:
            log.info("dtype %s skipped on cpu (%s): half precision is slow on CPUs; set model.cpu_half to force it",
                     str(dtype).removeprefix("torch."), reason)
            continue
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            log.info("dtype bfloat16 skipped: this GPU has no bfloat16 support")
            continue
        if dtype not in [d for d, _ in out]:
            out.append((dtype, reason))
    if not out:
        out.append((torch.float32, "every cascade entry was skipped on this device, so float32"))
    return out


def is_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all().item())
