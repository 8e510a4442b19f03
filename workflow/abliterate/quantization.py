"""bitsandbytes quantization: the one place a ``BitsAndBytesConfig`` is built.

``model.quantization`` is ``none``, ``bnb_4bit`` or ``bnb_8bit``. 4-bit uses NF4 with double
quantization (the QLoRA recipe: best accuracy per bit for normally distributed weights) and always an
explicit compute dtype, because bitsandbytes' default (float32) makes every matmul slow and the
silently chosen value differs between versions.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from .errors import QuantizationBackendError

log = logging.getLogger(__name__)

MODES = ("none", "bnb_4bit", "bnb_8bit")


def check_backend(mode: str, device: torch.device) -> None:
    """Raise with an actionable message when ``mode`` cannot run on this machine."""
    if mode not in MODES:
        raise QuantizationBackendError(f"model.quantization must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationBackendError(
            f"model.quantization: {mode} needs the bitsandbytes package, which is not installed. Install "
            "it with `pip install -e '.[quant]'` or set model.quantization: none in config.yaml.")
    if device.type != "cuda":
        raise QuantizationBackendError(
            f"model.quantization: {mode} needs a CUDA GPU for bitsandbytes, but this job runs on "
            f"{device.type}. Set model.quantization: none in config.yaml (or run the job on a GPU node).")


def bnb_config(mode: str, compute_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` for ``mode`` (None for ``none``)."""
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if mode == "bnb_4bit":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=compute_dtype)
        log.info("loading in 4-bit (nf4, double quantization) with compute dtype %s",
                 str(compute_dtype).removeprefix("torch."))
        return cfg
    if mode == "bnb_8bit":
        log.info("loading in 8-bit (LLM.int8) with compute dtype %s", str(compute_dtype).removeprefix("torch."))
        return BitsAndBytesConfig(load_in_8bit=True)
    raise QuantizationBackendError(f"model.quantization must be one of {', '.join(MODES)}, not {mode!r}")
