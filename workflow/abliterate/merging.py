"""Merge an exported ablation into a full model folder, on the CPU.

By default the merge streams (:mod:`abliterate.streaming_merge`): tensor by tensor from the
checkpoint's safetensors files into safetensors shards as ``save_pretrained`` writes them, so it needs
about one edited matrix of RAM. Sources it cannot stream (see ``streaming_merge.plan``) are reloaded
whole and unquantized on the CPU (a 4/8-bit study's adapter is merged into full-precision weights,
never into quantized ones), the PEFT adapter applied and merged, direct edits (modules LoRA cannot
wrap) added, and the result saved with ``save_pretrained``. Before any weight is read, the RAM either
needs is estimated and checked against a budget (``ram``). The folder is written atomically; a full
disk leaves nothing at the output path and raises an error naming it.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

import psutil
import torch

from . import ablation, io, loading, ram, streaming_merge
from .errors import AbliterateError

log = logging.getLogger(__name__)

# Loading keeps one copy of the weights; merging adds one layer's delta at a time; saving shards
# adds at most one shard. 1.2× the weights bounds all three with room for Python's own objects.
RAM_FACTOR = 1.2
MAX_SHARD_SIZE = "2GB"


def merge_dtype(config) -> torch.dtype:
    """The checkpoint's own dtype (what users expect back), float32 when it names none."""
    from .dtypes import checkpoint_dtype

    return checkpoint_dtype(config) or torch.float32


def merge(source: loading.ModelSource, adapter_dir: str, out_dir: str, max_ram_gib: float, metadata: dict,
          card: str, chat_template: str | None = None, save_dtype: torch.dtype | None = None,
          stream: bool = True) -> dict:
    """Load ``source`` on the CPU, merge ``adapter_dir`` into it and save it to ``out_dir``.

    ``chat_template`` (the study's, when the tokenizer lacks one) is saved with the tokenizer, so the
    merged model is prompted as the study prompted it. ``save_dtype`` (``merge.dtype``): the weights
    are saved in it; the merge itself runs in the checkpoint's dtype, so the edit is rounded once.
    ``stream``: merge tensor by tensor from the checkpoint's safetensors files (:mod:`streaming_merge`)
    when the source allows it; False (or a source it cannot read) loads the whole model instead.
    """
    start = time.perf_counter()
    config = loading.load_config(source)
    dtype = merge_dtype(config)
    saved = save_dtype or dtype
    res = loading.resolve(source)
    try:
        if not stream:
            raise streaming_merge.NotStreamable("stream=False")
        plan = streaming_merge.plan(res, config, adapter_dir, dtype, save_dtype, source.trust_remote_code,
                                    MAX_SHARD_SIZE)
        needed, how = streaming_merge.ram_bytes(plan), "the streaming CPU merge"
    except streaming_merge.NotStreamable as exc:
        log.info("merging the whole model in RAM, not tensor by tensor: %s", exc)
        plan, needed, how = None, int(ram.parameter_bytes(config, dtype) * RAM_FACTOR), "the CPU merge"
    ram.check(needed, max_ram_gib, how,
              "raise merge.max_ram_gib, run the merge on a larger node, or set merge.adapter_only: true")
    tokenizer = loading.load_tokenizer(source, chat_template)
    model = None if plan is not None else _merged_model(source, res, config, dtype, adapter_dir, saved)
    rss = psutil.Process().memory_info().rss
    try:
        with io.atomic_dir(out_dir) as tmp:
            if plan is not None:
                streaming_merge.write(plan, tmp)
            else:
                model.save_pretrained(tmp, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(card)
            io.write_json(metadata, tmp / "abliterate.json")
    except Exception as exc:  # safetensors' writer raises its own error type, naming the OS error
        if not _disk_full(exc):
            raise
        raise AbliterateError(
            f"the disk filled up while writing the merged model to {out_dir} ({exc}); nothing was left there: "
            f"free {_gib(plan, config, saved):.1f} GiB or more on {Path(out_dir).resolve().parent} and rerun"
        ) from exc
    seconds = time.perf_counter() - start
    peak = max(rss, psutil.Process().memory_info().rss)
    info = {"seconds": round(seconds, 2), "streamed": plan is not None, "dtype": str(dtype).removeprefix("torch."),
            "saved_dtype": str(saved).removeprefix("torch."), "estimated_ram_bytes": needed, "rss_bytes": peak}
    log.info("merged model saved to %s in %.1f s (%s, RSS %.2f GiB)", out_dir, seconds, info["saved_dtype"],
             peak / 2**30)
    return info


def _merged_model(source, res, config, dtype, adapter_dir, saved):
    """The whole-model merge: the model loaded on the CPU, the adapter merged, cast to ``saved``."""
    from transformers import AutoModelForCausalLM

    # the config read by the caller, not parsed again
    kwargs = dict(loading.pretrained_kwargs(res, source), dtype=dtype, config=config)
    model = AutoModelForCausalLM.from_pretrained(res.location, **kwargs)
    loading.drop_gguf_state(model)
    model = ablation.load_saved_adapter(model, adapter_dir, merge=True)
    if saved != dtype:
        model.to(saved)  # tensor by tensor: the RAM estimate above still holds
        log.info("merged in %s, saved in %s (merge.dtype)", str(dtype).removeprefix("torch."),
                 str(saved).removeprefix("torch."))
    return model


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return f"os error {errno.ENOSPC})" in str(exc) or f"os error {errno.EDQUOT})" in str(exc)


def _gib(plan, config, dtype) -> float:
    """Size of the merged weights, GiB."""
    if plan is not None:
        return streaming_merge.output_bytes(plan) / 2**30
    return ram.parameter_bytes(config, dtype) / 2**30
