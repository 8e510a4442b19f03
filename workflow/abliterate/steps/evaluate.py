"""Rule `evaluate`: reload the merged model from disk (or, with ``merge.adapter_only``, the base model
with the exported adapter), measure it on eval and held-out prompts and write ``summary.json`` (the
output contract documented in the README)."""

from __future__ import annotations

import csv
import importlib.metadata
import logging
import time
from pathlib import Path

import pandas as pd

from .. import ablation, devices, io, loading, session, study, study_storage
from ..answer_kl import BaseAnswers
from ..errors import ConfigError
from ..evaluation import measure
from ..rule_settings import typed
from .common import eval_settings, responses_table

log = logging.getLogger(__name__)

# The packages whose versions summary.json records (constraints.txt pins the tested ones).
VERSIONED = ("torch", "transformers", "peft", "optuna", "snakemake")


def package_versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str | None]:
    """The installed version of each package, from its distribution metadata (nothing is imported;
    None for one that is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def rule_timings(run: str, prompts_key: str, benchmarks_dir: str = "results/benchmarks") -> dict[str, float]:
    """Wall seconds per rule from Snakemake's benchmark files (rules with several jobs are summed);
    ``prompts_key`` names the prompt tables' folder (``workflow_config.prompts_dir``)."""
    root = Path(benchmarks_dir)
    prompts = root / "prompts" / prompts_key
    files = list((root / run).glob("*.tsv")) + list(prompts.glob("*.tsv")) + list(root.glob("demo_model.tsv"))
    out: dict[str, float] = {}
    for f in files:
        rule = f.stem.split("-")[0] if f.parent.name == run else ("prompts" if f.parent == prompts else f.stem)
        with f.open() as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            out[rule] = round(out.get(rule, 0.0) + float(rows[-1]["s"]), 2)
    return out


def with_adapter(lm: loading.LoadedModel, adapter_dir: str) -> loading.LoadedModel:
    """``lm`` (the base model as the study loaded it: device, dtype, quantization) with the exported
    adapter on top, unmerged: what a user of ``merge.adapter_only`` loads."""
    if lm.quantization != "none" and (Path(adapter_dir) / ablation.DIRECT_EDITS_FILE).exists():
        # Direct edits add B A to the weight itself, which a 4/8-bit weight cannot take.
        raise ConfigError(f"{adapter_dir} holds direct edits (modules LoRA cannot wrap), which cannot be "
                          f"applied to the {lm.quantization} base model; set merge.adapter_only: false to "
                          "evaluate the CPU merge")
    lm.model = ablation.load_saved_adapter(lm.model, adapter_dir)
    log.info("evaluating the base model with the adapter %s (merge.adapter_only: no merged model)", adapter_dir)
    return lm


def run(config: dict, model_dir: str | None, harmful: str, harmless: str, baseline_metrics: str,
        baseline_logprobs: str, selected_path: str, storage: str, study_name: str, out_summary: str,
        out_responses: str, config_hash: str, adapter_dir: str | None = None, ledger: str | None = None) -> dict:
    """Evaluate ``model_dir`` (the merged model) or, when it is None, the base model with ``adapter_dir``."""
    start = time.perf_counter()
    config = typed("evaluate", config)
    with study_storage.connection_errors(storage):
        stats = study.study_stats(storage, study_name, ledger)  # a lost study fails before the evaluation
    lm = session.open_model(config, path=model_dir) if model_dir else with_adapter(session.open_model(config), adapter_dir)
    settings = eval_settings(config.evaluation, lm, session.chats(config, lm.tokenizer, harmful, "heldout")[1])
    device = next(lm.model.parameters()).device
    base_lp, _ = io.load_safetensors(baseline_logprobs, device=device)
    merged: dict = {}
    tables = []
    for split in ("eval", "heldout"):
        raw, texts = session.chats(config, lm.tokenizer, harmful, split)
        _, harmless_texts = session.chats(config, lm.tokenizer, harmless, split)
        found = measure(lm.model, lm.tokenizer, settings, texts, harmless_texts, base_lp[split], progress=True,
                        base_answers=BaseAnswers.from_tensors(base_lp, split))
        tables.append(responses_table(raw, found.responses, found.refused, split))
        merged[split] = found.counts()
        log.info("merged %s: %d/%d refusals, KL %.4f", split, found.refusals, found.n, found.kl)
    raw, texts = session.chats(config, lm.tokenizer, harmless, "heldout")
    found = measure(lm.model, lm.tokenizer, settings, harmful=texts, progress=True)
    tables.append(responses_table(raw, found.responses, found.refused, "harmless_heldout"))
    merged["harmless_heldout"] = found.counts()
    io.write_parquet(pd.concat(tables, ignore_index=True), out_responses, metadata={"config_hash": config_hash})

    baseline = io.read_json(baseline_metrics)
    selected = io.read_json(selected_path)
    summary = {
        "run": config.run, "model": baseline["model"], "dtype": baseline.get("dtype"),
        "quantization": baseline.get("quantization"), "config_hash": config_hash,
        "evaluated": "merged" if model_dir else "adapter",
        "baseline": {k: baseline[k] for k in ("eval", "heldout", "harmless_heldout")},
        "selected_trial": {
            **{k: selected[k] for k in ("number", "params", "reason", "eval")},
            **({"confirmation": selected["confirmation"]} if "confirmation" in selected else {}),
        },
        "merged": merged,
        "study": {"name": study_name, **{k: stats[k] for k in ("n_complete", "n_dominated", "n_failed", "seconds")}},
        # this job's own time: its benchmark file is written only after it ends
        "timings_s": rule_timings(config.run, Path(harmful).parent.name)  # the prompts folder
        | {"evaluate": round(time.perf_counter() - start, 2)},
        "versions": package_versions(),
    }
    io.write_json(summary, out_summary)
    del lm
    devices.free_memory()
    return summary
