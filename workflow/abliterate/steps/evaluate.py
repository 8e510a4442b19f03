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

from .. import ablation, devices, heldout, io, loading, session, study, study_storage
from ..answer_kl import BaseAnswers
from ..errors import ConfigError, DamagedFileError
from ..evaluation import measure
from ..judge import Judge, agreement
from ..judge import columns as judge_columns
from ..rule_settings import typed
from .common import eval_settings, resolve_batch_size, responses_table

log = logging.getLogger(__name__)

# The packages whose versions summary.json records (constraints.txt pins the tested ones).
VERSIONED = ("torch", "transformers", "peft", "optuna", "snakemake")

# A GGUF judge dequantised once, kept across runs (a cache like common.BATCH_CACHE, not an artifact).
JUDGE_CACHE = "results/judges"


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
        out_responses: str, config_hash: str, adapter_dir: str | None = None, ledger: str | None = None,
        baseline_responses: str | None = None) -> dict:
    """Evaluate ``model_dir`` (the merged model) or, when it is None, the base model with ``adapter_dir``;
    with ``evaluation.judge``, the judge also reads the base model's held-out answers (``baseline_responses``)."""
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
    ev = config.evaluation
    answers: dict[str, heldout.HeldoutAnswers] = {}
    for split in ("eval", "heldout"):
        raw, texts = session.chats(config, lm.tokenizer, harmful, split)
        _, harmless_texts = session.chats(config, lm.tokenizer, harmless, split)
        if split == "heldout":  # answers generated whole (abliterate.heldout); the KL as for eval
            found = measure(lm.model, lm.tokenizer, settings, harmless=harmless_texts, base_logprobs=base_lp[split],
                            base_answers=BaseAnswers.from_tensors(base_lp, split))
            answers[split] = held = _answer(lm, settings, ev, texts)
            tables.append(held.table(raw, split))
            merged[split] = {**held.counts(), **{k: v for k, v in found.counts().items() if k.startswith("kl")}}
            log.info("merged %s: %d/%d refusals (%d late), KL %.4f", split, merged[split]["refusals"],
                     len(texts), merged[split]["late_refusals"], found.kl)
            continue
        found = measure(lm.model, lm.tokenizer, settings, texts, harmless_texts, base_lp[split], progress=True,
                        base_answers=BaseAnswers.from_tensors(base_lp, split))
        tables.append(responses_table(raw, found.responses, found.refused, split))
        merged[split] = found.counts()
        log.info("merged %s: %d/%d refusals, KL %.4f", split, found.refusals, found.n, found.kl)
    raw, texts = session.chats(config, lm.tokenizer, harmless, "heldout")
    answers["harmless_heldout"] = held = _answer(lm, settings, ev, texts)
    tables.append(held.table(raw, "harmless_heldout"))
    merged["harmless_heldout"] = held.counts()
    del lm
    devices.free_memory()
    responses = heldout.with_late_column(tables)
    baseline = io.read_json(baseline_metrics)
    if ev.judge is not None:
        if baseline_responses is None:
            raise ValueError("evaluation.judge needs the baseline's responses table")
        for label, verdicts in judge_heldout(ev.judge, responses, answers, baseline_responses).items():
            merged[label]["judge"] = verdicts["merged"]
            baseline[label]["judge"] = verdicts["baseline"]
    io.write_parquet(responses, out_responses, metadata={"config_hash": config_hash})

    selected = io.read_json(selected_path)
    summary = {
        "run": config.run, "model": baseline["model"], "dtype": baseline.get("dtype"),
        "quantization": baseline.get("quantization"), "config_hash": config_hash,
        "evaluated": "merged" if model_dir else "adapter",
        "baseline": {k: baseline[k] for k in ("eval", "heldout", "harmless_heldout")},
        "selected_trial": {
            **{k: selected[k] for k in ("number", "params", "reason", "eval")},
            "components_off": selected.get("components_off", []),
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
    return summary


def _answer(lm, settings, ev, texts: list[str]) -> heldout.HeldoutAnswers:
    batch = resolve_batch_size(ev.batch_size, lm, ev.heldout_max_new_tokens, texts, ev.cuda_graphs)
    return heldout.answer(lm.model, lm.tokenizer, settings, texts, ev.heldout_max_new_tokens, batch, True)


def judge_heldout(settings, responses: pd.DataFrame, answers: dict, baseline_responses: str) -> dict:
    """The judge's verdicts on the held-out answers of the merged model (added to ``responses`` as
    columns; rows of the eval split get none) and of the base model (its baseline responses table):
    per split, the judge's counts and their agreement with the markers on the same whole answers."""
    judge = Judge.load(settings, cache_root=JUDGE_CACHE)
    base = pd.read_parquet(baseline_responses)
    out: dict = {}
    for label in ("heldout", "harmless_heldout"):
        rows = responses.index[responses["set"] == label]
        verdicts = judge.judge(responses.loc[rows, "prompt"].tolist(), responses.loc[rows, "response"].tolist())
        for column, values in judge_columns(verdicts).items():
            responses.loc[rows, column] = pd.Series(values, index=rows)
        mine = base[base["set"] == label]
        if "late_refusal" not in mine:
            raise DamagedFileError(f"{baseline_responses} has no late_refusal column: it was written before "
                                   "held-out answers were generated whole; delete it to rerun the baseline")
        base_verdicts = judge.judge(mine["prompt"].tolist(), mine["response"].tolist())
        out[label] = {
            "merged": agreement(verdicts, answers[label].refused_anywhere),
            "baseline": agreement(base_verdicts, (mine["refusal"] | mine["late_refusal"].fillna(False)).tolist()),
        }
        log.info("judge on %s: merged %d/%d refused (%d unclear), baseline %d/%d (%d unclear)", label,
                 out[label]["merged"]["refusals"], len(verdicts), out[label]["merged"]["unclear"],
                 out[label]["baseline"]["refusals"], len(base_verdicts), out[label]["baseline"]["unclear"])
    del judge
    devices.free_memory()
    return out
