"""Merge an exported ablation into a full model folder, on the CPU.

The base model is reloaded unquantized on the CPU (a 4/8-bit study's adapter is merged into
full-precision weights, never into quantized ones), the PEFT adapter applied and merged, direct
edits (modules LoRA cannot wrap) added, and the result saved with ``save_pretrained`` as
safetensors shards. Before loading, the RAM it needs is estimated from the model config and checked
against a budget (``ram``).
"""

from __future__ import annotations

import logging
import time

import psutil
import torch

from . import ablation, io, loading, ram

log = logging.getLogger(__name__)

# Loading keeps one copy of the weights; merging adds one layer's delta at a time; saving shards
# adds at most one shard. 1.2× the weights bounds all three with room for Python's own objects.
RAM_FACTOR = 1.2


def merge_dtype(config) -> torch.dtype:
    """The checkpoint's own dtype (what users expect back), float32 when it names none."""
    from .dtypes import checkpoint_dtype

    return checkpoint_dtype(config) or torch.float32


def merge(source: loading.ModelSource, adapter_dir: str, out_dir: str, max_ram_gib: float, metadata: dict,
          card: str, chat_template: str | None = None, save_dtype: torch.dtype | None = None) -> dict:
    """Load ``source`` on the CPU, merge ``adapter_dir`` into it and save it to ``out_dir``.

    ``chat_template`` (the study's, when the tokenizer lacks one) is saved with the tokenizer, so the
    merged model is prompted as the study prompted it. ``save_dtype`` (``merge.dtype``): the weights
    are saved in it; the merge itself runs in the checkpoint's dtype, so the edit is rounded once.
    """
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    config = loading.load_config(source)
    dtype = merge_dtype(config)
    needed = int(ram.parameter_bytes(config, dtype) * RAM_FACTOR)
    ram.check(needed, max_ram_gib, "the CPU merge",
              "raise merge.max_ram_gib, run the merge on a larger node, or set merge.adapter_only: true")
    res = loading.resolve(source)
    tokenizer = loading.load_tokenizer(source, chat_template)
    # the config read above, not parsed again
    kwargs = dict(loading.pretrained_kwargs(res, source), dtype=dtype, config=config)
    model = AutoModelForCausalLM.from_pretrained(res.location, **kwargs)
    loading.drop_gguf_state(model)
    model = ablation.load_saved_adapter(model, adapter_dir, merge=True)
    rss = psutil.Process().memory_info().rss
    saved = save_dtype or dtype
    if saved != dtype:
        model.to(saved)  # tensor by tensor: the RAM estimate above still holds
        log.info("merged in %s, saved in %s (merge.dtype)", str(dtype).removeprefix("torch."),
                 str(saved).removeprefix("torch."))
    with io.atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        io.write_json(metadata, tmp / "abliterate.json")
    seconds = time.perf_counter() - start
    peak = max(rss, psutil.Process().memory_info().rss)
    info = {"seconds": round(seconds, 2), "dtype": str(dtype).removeprefix("torch."),
            "saved_dtype": str(saved).removeprefix("torch."), "estimated_ram_bytes": needed, "rss_bytes": peak}
    log.info("merged model saved to %s in %.1f s (%s, RSS %.2f GiB)", out_dir, seconds, info["saved_dtype"],
             peak / 2**30)
    return info
