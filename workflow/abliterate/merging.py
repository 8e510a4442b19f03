"""Merge an exported ablation into a full model folder, on the CPU.

The base model is reloaded unquantized on the CPU (a 4/8-bit study's adapter is merged into
full-precision weights, never into quantized ones), the PEFT adapter applied and merged, direct
edits (modules LoRA cannot wrap) added, and the result saved with ``save_pretrained`` as
safetensors shards. Before loading, the RAM it needs is estimated from the model config and checked
against a budget, so a merge that cannot fit stops at once instead of swapping for an hour.
"""

from __future__ import annotations

import logging
import time

import psutil
import torch

from . import ablation, io, loading
from .errors import AbliterateError

log = logging.getLogger(__name__)

# Loading keeps one copy of the weights; merging adds one layer's delta at a time; saving shards
# adds at most one shard. 1.2× the weights bounds all three with room for Python's own objects.
RAM_FACTOR = 1.2


def parameter_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the weights of a model built from ``config`` in ``dtype``, without allocating them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # tied embeddings are one tensor on disk and in RAM: count them once
    n = sum(p.numel() for p in model.parameters())
    return n * torch.finfo(dtype).bits // 8 if dtype.is_floating_point else n * 4


def check_ram(needed: int, max_ram_gib: float) -> None:
    budget = max_ram_gib * 2**30
    available = psutil.virtual_memory().available
    log.warning("CPU merge needs about %.2f GiB of RAM (budget merge.max_ram_gib %.1f GiB, %.1f GiB available now)",
                needed / 2**30, max_ram_gib, available / 2**30)
    if needed > budget:
        raise AbliterateError(
            f"the CPU merge needs about {needed / 2**30:.1f} GiB, more than merge.max_ram_gib ({max_ram_gib} GiB); "
            "raise merge.max_ram_gib, run the merge on a larger node, or set merge.adapter_only: true"
        )
    if needed > available:
        log.warning("less RAM is free (%.1f GiB) than the merge needs: it may swap", available / 2**30)


def merge_dtype(config) -> torch.dtype:
    """The checkpoint's own dtype (what users expect back), float32 when it names none."""
    from .dtypes import checkpoint_dtype

    return checkpoint_dtype(config) or torch.float32


def merge(source: loading.ModelSource, adapter_dir: str, out_dir: str, max_ram_gib: float, metadata: dict,
          card: str, chat_template: str | None = None) -> dict:
    """Load ``source`` on the CPU, merge ``adapter_dir`` into it and save it to ``out_dir``.

    ``chat_template`` (the study's, when the tokenizer lacks one) is saved with the tokenizer, so the
    merged model is prompted as the study prompted it.
    """
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    config = loading.load_config(source)
    dtype = merge_dtype(config)
    needed = int(parameter_bytes(config, dtype) * RAM_FACTOR)
    check_ram(needed, max_ram_gib)
    res = loading.resolve(source)
    tokenizer = loading.load_tokenizer(source, chat_template)
    kwargs = {"dtype": dtype, "trust_remote_code": source.trust_remote_code, "config": config}  # not parsed twice
    if res.gguf_file:
        kwargs["gguf_file"] = res.gguf_file
    if res.revision:
        kwargs["revision"] = res.revision
    model = AutoModelForCausalLM.from_pretrained(res.location, **kwargs)
    loading.drop_gguf_state(model)
    model = ablation.load_saved_adapter(model, adapter_dir, merge=True)
    rss = psutil.Process().memory_info().rss
    with io.atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        io.write_json(metadata, tmp / "abliterate.json")
    seconds = time.perf_counter() - start
    peak = max(rss, psutil.Process().memory_info().rss)
    info = {"seconds": round(seconds, 2), "dtype": str(dtype).removeprefix("torch."), "estimated_ram_bytes": needed,
            "rss_bytes": peak}
    log.info("merged model saved to %s in %.1f s (%s, RSS %.2f GiB)", out_dir, seconds, info["dtype"], peak / 2**30)
    return info
