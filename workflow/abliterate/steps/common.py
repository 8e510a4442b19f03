"""Pieces the GPU steps share: evaluation settings and refusal counting on a split."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

from .. import generation, refusal

log = logging.getLogger(__name__)

CPU_BATCH = 16  # CPUs gain little from larger batches and padding waste grows with them


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int
    batch_size: int
    detector: refusal.RefusalDetector


def resolve_batch_size(value, lm, max_new_tokens: int) -> int:
    """An explicit size, or the automatic choice for this model and device (logged once)."""
    if value != "auto":
        return int(value)
    device = next(lm.model.parameters()).device
    if device.type != "cuda":
        log.info("batch size %d (auto on %s: a fixed size; larger batches only add padding here)", CPU_BATCH, device.type)
        return CPU_BATCH
    from .. import batching

    return batching.auto_batch_for(lm, max_new_tokens)


def eval_settings(config: dict, lm) -> EvalSettings:
    ev = config["evaluation"]
    markers = ev["markers"] or refusal.DEFAULT_MARKERS
    return EvalSettings(
        max_new_tokens=ev["max_new_tokens"],
        batch_size=resolve_batch_size(ev["batch_size"], lm, ev["max_new_tokens"]),
        detector=refusal.RefusalDetector(markers),
    )


def refusal_counts(model, tokenizer, texts: list[str], settings: EvalSettings) -> tuple[dict, list[str], list[bool]]:
    """Generate (stopping at the first refusal marker) and count refusals."""
    responses = generation.generate(
        model, tokenizer, texts, settings.max_new_tokens, settings.batch_size, settings.detector, progress=True
    )
    flags = [settings.detector.is_refusal(r) for r in responses]
    return {"refusals": int(sum(flags)), "n": len(flags)}, responses, flags


def responses_table(prompts: list[str], responses: list[str], flags: list[bool], label: str) -> pd.DataFrame:
    return pd.DataFrame({"set": label, "prompt": prompts, "response": responses, "refusal": flags})
