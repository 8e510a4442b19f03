"""Rule `export`: choose a trial, write its parameters, the Pareto table and plot, and its adapter."""

from __future__ import annotations

import logging

import pandas as pd

from .. import ablation, answer_kl, devices, editors, io, selection, session
from ..evaluation import Evaluator, measure
from ..generation import RefusalLimitReached
from ..rule_settings import typed
from .common import eval_settings
from .study import build_editor

log = logging.getLogger(__name__)


def policy(config) -> dict:
    return {"name": config.export.policy, "refusal_target": config.export.refusal_target, "fallback": "knee"}


def params_of(row: pd.Series) -> dict:
    """The flat ablation parameters of a trials-table row (NaN direction_index: per-layer directions;
    no ``n_directions`` column: a study from before direction sets, one direction)."""
    params: dict = {"direction_index": None if pd.isna(row["direction_index"]) else float(row["direction_index"])}
    if not pd.isna(row.get(ablation.N_DIRECTIONS, float("nan"))):
        params[ablation.N_DIRECTIONS] = int(row[ablation.N_DIRECTIONS])
    if not pd.isna(row.get(ablation.SECONDARY_WEIGHT, float("nan"))):
        params[ablation.SECONDARY_WEIGHT] = float(row[ablation.SECONDARY_WEIGHT])
    off = row.get(ablation.OFF)
    if isinstance(off, str) and off:
        params[ablation.OFF] = off
    params.update({k: float(v) for k, v in row.items() if "." in str(k) and not pd.isna(v)})
    return params


def max_directions(df: pd.DataFrame) -> int:
    """The most directions any trial of the table ablates (what an editor for its trials must cover)."""
    if ablation.N_DIRECTIONS not in df or df[ablation.N_DIRECTIONS].isna().all():
        return 1
    return int(df[ablation.N_DIRECTIONS].max())


def confirm(config, lm, editor: editors.Editor, df: pd.DataFrame, harmful: str, harmless: str,
            kl_n: int) -> tuple[pd.Series | None, dict | None]:
    """Measure the front trials within the refusal target on the train prompts and choose among
    those that stay within it on eval and train together (:func:`abliterate.selection.select_confirmed`). Returns the chosen row (None:
    keep the eval choice) and the record for ``selected.json`` (None when there was nothing to do)."""
    from tqdm.auto import tqdm

    candidates = selection.confirmation_candidates(df, policy(config))
    if candidates.empty:
        log.info("confirmation skipped: no trial reached the refusal target on the eval prompts")
        return None, None
    _, harmful_texts = session.chats(config, lm.tokenizer, harmful, "train")
    _, harmless_texts = session.chats(config, lm.tokenizer, harmless, "train")
    if not harmful_texts or not harmless_texts:
        log.warning("confirmation skipped: the train split has %d harmful and %d harmless prompts",
                    len(harmful_texts), len(harmless_texts))
        return None, None
    settings = eval_settings(config.evaluation, lm, harmful_texts)
    # the unedited model's answers on the train prompts: the baseline rule measures eval and held-out only
    base_lp = measure(lm.model, lm.tokenizer, settings, harmless=harmless_texts).logprobs
    answers = {}
    if config.study.objective_kl == "answer":  # the trials' KL is the answer KL: confirm the same one
        answers = {"objective_kl": "answer",
                   "base_answers": answer_kl.base_answers(lm.model, lm.tokenizer, harmless_texts,
                                                          config.evaluation.kl_tokens, settings.batch_size,
                                                          config.evaluation.kl_top_k, settings.cuda_graphs,
                                                          first=base_lp)}
    evaluator = Evaluator(editor.model, lm.tokenizer, harmful_texts, harmless_texts, base_lp,
                          settings.max_new_tokens, settings.batch_size, settings.detector,
                          cuda_graphs=settings.cuda_graphs, **answers)
    log.info("confirming the %d front trials within the refusal target on %d harmful and %d harmless train "
             "prompts", len(candidates), len(harmful_texts), len(harmless_texts))
    rows, best_kl, chosen, reason = [], None, None, ""
    for _, row in tqdm(list(candidates.iterrows()), desc="confirm", unit="trial"):
        editor.apply(ablation.AblationParams.from_flat(params_of(row)))
        try:
            train_kl = evaluator.kl()
            cap = selection.confirmation_cap(row, kl_n, train_kl, len(harmless_texts), len(harmful_texts), best_kl,
                                             policy(config))
            try:
                refusals, stopped = evaluator.refusals(max_refusals=cap), False
            except RefusalLimitReached as stop:
                refusals, stopped = stop.refusals, True
        finally:
            editor.reset()
        got = {**row.to_dict(), "kl_n": kl_n, "confirm_refusals": refusals, "confirm_n": len(harmful_texts),
               "confirm_kl": train_kl, "confirm_kl_n": len(harmless_texts), "confirm_stopped": stopped}
        rows.append(got)
        chosen, reason = selection.select_confirmed(pd.DataFrame(rows), policy(config))
        best_kl = None if chosen is None else float(chosen["pooled_kl"])
        log.info("trial %d: eval %d/%d KL %.4f, train %s%d/%d KL %.4f%s", int(row["number"]), int(row["refusals"]),
                 int(row["n"]), float(row["kl"]), ">= " if stopped else "", refusals, len(harmful_texts), train_kl,
                 " (stopped: it cannot be chosen)" if stopped else "")
    record = {
        "split": "train",
        "reason": reason,
        "candidates": [
            {"number": int(r["number"]),
             "eval": {"refusals": int(r["refusals"]), "n": int(r["n"]), "kl": float(r["kl"])},
             "train": {"refusals": int(r["confirm_refusals"]), "n": int(r["confirm_n"]), "kl": float(r["confirm_kl"]),
                       "stopped": bool(r["confirm_stopped"])}}
            for r in rows
        ],
    }
    del evaluator
    return chosen, record


def run(config: dict, trials: str, harmful: str, harmless: str, directions_path: str,
        out_selected: str, out_pareto: str, out_adapter: str, out_plot: str, config_hash: str) -> dict:
    config = typed("export", config)
    df = pd.read_csv(trials)
    named = config.export.trial
    if named is None:
        row, reason = selection.select_trial(df, policy(config))
        log.info("selected on the eval prompts: %s", reason)
    else:
        row, reason = selection.named_trial(df, named)
        log.info("selected %s; no policy, no confirmation", reason)
    lm = session.open_model(config)
    editor = None
    confirmation = None
    if config.export.confirm and named is None:
        # the study's route: on the CPU that edits in place, faster than LoRA's extra matmuls; reset
        # restores the weights bit for bit before the LoRA wrapping below
        editor = build_editor(config, lm, directions_path, n_directions=max_directions(df))
        kl_n = len(session.read_split(harmless, "eval"))  # the harmless prompts behind the eval KL
        chosen, confirmation = confirm(config, lm, editor, df, harmful, harmless, kl_n)
        if confirmation is not None:
            confirmation["eval_choice"] = int(row["number"])
            if chosen is None:
                log.warning("kept the eval choice: %s", confirmation["reason"])
            else:
                if int(chosen["number"]) != int(row["number"]):
                    log.info("confirmation changed the choice from trial %d to %d", int(row["number"]),
                             int(chosen["number"]))
                row, reason = chosen, confirmation["reason"]
                log.info("selected after confirmation: %s", reason)
    if not isinstance(editor, editors.LoraEditor):
        # the adapter folder, what the merge rule and users load, is a PEFT adapter: in-place edits
        # (already reset) cannot write one
        editor = build_editor(config, lm, directions_path, route="lora", n_directions=max_directions(df))
    front = selection.pareto_front(df)
    io.write_csv(front, out_pareto)
    selection.plot_pareto(df, int(row["number"]), out_plot)
    params = params_of(row)
    editor.apply(ablation.AblationParams.from_flat(params))
    meta = {**lm.metadata(), "config_hash": config_hash, "trial": int(row["number"])}
    editor.save(out_adapter)
    selected = {
        "number": int(row["number"]),
        "params": params,
        # kinds whose sampled max_weight was below 0: not edited (study.space.max_weight)
        "components_off": ablation.off_kinds(params),
        "reason": reason,
        "eval": {"refusals": int(row["refusals"]), "n": int(row["n"]), "kl": float(row["kl"])},
        **({"confirmation": confirmation} if confirmation is not None else {}),
        **meta,
    }
    io.write_json(selected, out_selected)
    del editor, lm
    devices.free_memory()
    return selected
