"""Pieces the GPU steps share: the evaluation settings of a config and the responses table."""

from __future__ import annotations

import logging

import pandas as pd

from .. import batching, generation, kl, refusal
from ..evaluation import EvalSettings

log = logging.getLogger(__name__)

# Batch sizes found by probing a GPU, per model and GPU model: a cache, not a pipeline artifact.
BATCH_CACHE = "results/batch_sizes.json"


def resolve_batch_size(value, lm, max_new_tokens: int, texts: list[str], cuda_graphs: bool = True) -> int:
    """An explicit size, or the automatic choice for this model, device and workload.

    On CUDA the probe generates the full token budget for copies of the longest prompt (the worst
    case the real work meets); the result is cached per model and GPU in ``BATCH_CACHE``.
    """
    if value != "auto":
        return int(value)
    longest = max(texts, key=len)

    def probe(size: int) -> None:
        if max_new_tokens > 1:
            generation.generate(lm.model, lm.tokenizer, [longest] * size, max_new_tokens, size,
                                cuda_graphs=cuda_graphs)
        else:
            kl.first_token_logprobs(lm.model, lm.tokenizer, [longest] * size, size)

    device = next(lm.model.parameters()).device
    # the two decoding paths hold different memory (a full-length cache and a graph's pool, or a
    # cache that grows by doubling): a size probed for one is not reused for the other
    decode = "graphs" if cuda_graphs and max_new_tokens > 1 else "continuous"
    key = f"{lm.source.description}|{lm.dtype}|{lm.quantization}|{max_new_tokens}|{len(longest)}|{decode}"
    cap = 1 << max(0, (len(texts) - 1).bit_length())  # a batch larger than the work is never used
    return batching.auto_batch_size(probe, device, key, BATCH_CACHE, start=1, max_size=min(256, cap))


def eval_settings(ev, lm, texts: list[str]) -> EvalSettings:
    """Settings for generating answers to ``texts`` (used to size the batch); ``ev``: the
    ``evaluation`` section of a rule's typed settings (:func:`abliterate.rule_settings.typed`)."""
    batch_size = resolve_batch_size(ev.batch_size, lm, ev.max_new_tokens, texts, ev.cuda_graphs)
    detector = refusal.RefusalDetector(ev.markers or refusal.DEFAULT_MARKERS)
    return EvalSettings(ev.max_new_tokens, batch_size, detector, cuda_graphs=ev.cuda_graphs)


def responses_table(prompts: list[str], responses: list[str], flags: list[bool], label: str) -> pd.DataFrame:
    return pd.DataFrame({"set": label, "prompt": prompts, "response": responses, "refusal": flags})
