"""Rule `baseline`: the unmodified model's refusals, its first-token log-probabilities and its
answers to the harmless prompts with their log-probabilities (:mod:`abliterate.answer_kl`)."""

from __future__ import annotations

import logging

import pandas as pd

from .. import answer_kl, devices, heldout, io, prompts, session
from ..evaluation import measure
from ..rule_settings import typed
from .common import eval_settings, resolve_batch_size, responses_table

log = logging.getLogger(__name__)


def run(config: dict, harmful: str, harmless: str, out_responses: str, out_logprobs: str, out_metrics: str,
        config_hash: str) -> dict:
    config = typed("baseline", config)
    prompts.check_no_cross_overlap({"harmful": pd.read_parquet(harmful), "harmless": pd.read_parquet(harmless)})
    lm = session.open_model(config)
    metrics: dict = {"model": lm.source.description, "config_hash": config_hash, **lm.metadata()}
    work = {label: session.chats(config, lm.tokenizer, table, split)
            for table, split, label in ((harmful, "eval", "eval"), (harmful, "heldout", "heldout"),
                                        (harmless, "heldout", "harmless_heldout"))}
    settings = eval_settings(config.evaluation, lm, [t for _, texts in work.values() for t in texts])
    tables = []
    for label, (raw, texts) in work.items():
        if label != "eval":  # held-out answers are generated whole (abliterate.heldout)
            ev = config.evaluation
            batch = resolve_batch_size(ev.batch_size, lm, ev.heldout_max_new_tokens, texts, ev.cuda_graphs)
            held = heldout.answer(lm.model, lm.tokenizer, settings, texts, ev.heldout_max_new_tokens, batch, True)
            metrics[label] = held.counts()
            tables.append(held.table(raw, label))
            log.info("baseline %s: %d/%d refusals, %d more after %d tokens", label, metrics[label]["refusals"],
                     len(texts), metrics[label]["late_refusals"], ev.max_new_tokens)
            continue
        found = measure(lm.model, lm.tokenizer, settings, harmful=texts, progress=True)
        metrics[label] = found.counts()
        tables.append(responses_table(raw, found.responses, found.refused, label))
        log.info("baseline %s: %d/%d refusals", label, found.refusals, found.n)
    if metrics["eval"]["refusals"] == 0:
        # Not an error: measuring a model is legitimate, but every trial can then only add KL.
        log.warning("the unmodified model refuses none of the %d eval harmful prompts: there is no refusal "
                    "to remove (a base model, a model never taught to refuse, or refusals worded in a way "
                    "evaluation.markers misses: see baseline/responses.parquet); the study can only add KL",
                    metrics["eval"]["n"])
    logprobs = {}
    for split in ("eval", "heldout"):
        _, texts = session.chats(config, lm.tokenizer, harmless, split)
        logprobs[split] = measure(lm.model, lm.tokenizer, settings, harmless=texts).logprobs
        answers = answer_kl.base_answers(lm.model, lm.tokenizer, texts, config.evaluation.kl_tokens,
                                         settings.batch_size, config.evaluation.kl_top_k, settings.cuda_graphs,
                                         first=logprobs[split])
        tail = answers.mean_tail_mass()
        log.info("baseline %s answer KL store: top %d tokens per answer position after the first, mean base tail "
                 "mass %s (the coarsened answer KL equals the exact one where it is 0)", split, answers.top_k,
                 "n/a (no counted position after the first)" if tail is None else f"{tail:.4g}")
        logprobs |= answers.tensors(split)
    io.write_parquet(heldout.with_late_column(tables), out_responses, metadata={"config_hash": config_hash})
    io.save_safetensors(logprobs, out_logprobs, metadata={**lm.metadata(), "config_hash": config_hash})
    io.write_json(metrics, out_metrics)
    del lm
    devices.free_memory()
    return metrics
