"""Rule `export`: choose a trial, write its parameters, the Pareto table and plot, and its adapter."""

from __future__ import annotations

import logging

import pandas as pd

from .. import ablation, devices, io, selection, session
from .study import build_objective

log = logging.getLogger(__name__)


def policy(config: dict) -> dict:
    return {"name": config["export"]["policy"], "refusal_target": config["export"]["refusal_target"], "fallback": "knee"}


def params_of(row: pd.Series) -> dict:
    """The flat ablation parameters of a trials-table row (NaN direction_index: per-layer directions)."""
    params: dict = {"direction_index": None if pd.isna(row["direction_index"]) else float(row["direction_index"])}
    params.update({k: float(v) for k, v in row.items() if "." in str(k) and not pd.isna(v)})
    return params


def run(config: dict, trials: str, harmful: str, harmless: str, directions_path: str, baseline_path: str,
        out_selected: str, out_pareto: str, out_adapter: str, out_plot: str, config_hash: str) -> dict:
    df = pd.read_csv(trials)
    row, reason = selection.select_trial(df, policy(config))
    log.info("selected %s", reason)
    front = selection.pareto_front(df)
    io.write_csv(front, out_pareto)
    selection.plot_pareto(df, int(row["number"]), out_plot)
    params = params_of(row)
    lm = session.open_model(config)
    # LoRA: the adapter folder is what the merge rule and users load.
    objective, _, ablator = build_objective(config, lm, harmful, harmless, directions_path, baseline_path,
                                            route="lora")
    ablator.apply(ablation.AblationParams.from_flat(params))
    meta = {**lm.metadata(), "config_hash": config_hash, "trial": int(row["number"])}
    ablator.save_adapter(out_adapter)
    selected = {
        "number": int(row["number"]),
        "params": params,
        "reason": reason,
        "eval": {"refusals": int(row["refusals"]), "n": int(row["n"]), "kl": float(row["kl"])},
        **meta,
    }
    io.write_json(selected, out_selected)
    del objective, ablator, lm
    devices.free_memory()
    return selected
