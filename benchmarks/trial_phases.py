"""Where a study trial's time goes: apply the edit, first-token KL, refusal generation, reset.

Rebuilds the study's objective from a finished compare.py run of ours (its config, prompt tables,
directions, baseline and study database), then replays chosen trials' parameters phase by phase,
each trial ``--reps`` times (the median is kept). A profile of one more replay gives the share of
the dense matrix products. Run it with nothing else on the machine.

    python benchmarks/trial_phases.py --work benchmarks/work/cpu-real-seed44 --trials 0 4 6 \\
        --heads auto full --out benchmarks/results/trial-phases-cpu-real-seed44-heads.json
"""

from __future__ import annotations

import argparse
import glob
import logging
import statistics
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent / "workflow"))

from compare import write_json_atomic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a compare.py working folder with ours/ in it")
    ap.add_argument("--trials", type=int, nargs="+", required=True, help="trial numbers to replay")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--heads", nargs="+", choices=("auto", "full"), default=["auto"],
                    help="output layer of the decode steps: auto (screened where it fits, "
                         "abliterate.greedy_head) or full; several are replayed in turn, rep by rep")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import optuna
    import torch
    import yaml
    from abliterate import ablation, devices, greedy_head, session
    from abliterate.architecture import unwrap
    from abliterate import rule_settings as rs
    from abliterate import workflow_config as wc
    from abliterate.rule_settings import typed
    from abliterate.steps import study as study_step
    from snakemake.utils import validate

    ours = args.work.resolve() / "ours"
    config = yaml.safe_load((ours / "config.yaml").read_text())
    validate(config, str(BENCHMARKS.parent / "workflow" / "schemas" / "config.schema.yaml"))
    wc.check(config)
    run = ours / "results" / config["run"]
    prompts = ours / rs.prompts_dir(config)
    settings = typed("study", rs.settings(config, "study"))
    lm = session.open_model(settings)
    objective, _, editor = study_step.build_objective(
        settings, lm, str(prompts / "harmful.parquet"), str(prompts / "harmless.parquet"),
        str(run / "directions.safetensors"), str(run / "baseline" / "logprobs.safetensors"), reuse_layers=True)
    evaluator = objective.evaluator
    storage = f"sqlite:///{glob.glob(str(run / '*.sqlite'))[0]}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    trials = {t.number: t for t in study.trials}

    def replay(number: int) -> dict:
        params = ablation.AblationParams.from_flat(trials[number].user_attrs["ablation_params"])
        t0 = time.perf_counter()
        editor.apply(params)
        t1 = time.perf_counter()
        first = editor.first_edited_layer
        kl = evaluator.kl(first)
        t2 = time.perf_counter()
        refusals = evaluator.refusals(first)
        t3 = time.perf_counter()
        editor.reset()
        t4 = time.perf_counter()
        return {"first_edited": first, "kl": kl, "refusals": refusals, "apply_s": t1 - t0, "kl_s": t2 - t1,
                "refusals_s": t3 - t2, "reset_s": t4 - t3}

    out = {"work": str(args.work), "threads": torch.get_num_threads(), "device": str(devices.get_device()),
           "n_harmful": len(evaluator.harmful_texts), "n_harmless": len(evaluator.harmless_texts),
           "max_new_tokens": evaluator.max_new_tokens, "trials": {}}
    out["heads"] = args.heads
    decoded = unwrap(lm.model)
    for number in args.trials:
        runs: dict[str, list[dict]] = {head: [] for head in args.heads}
        for _ in range(args.reps):  # in turn, so that a drifting machine slows every head alike
            for head in args.heads:
                greedy_head.set_screening(decoded, head == "auto")
                runs[head].append(replay(number))
        out["trials"][number] = {
            head: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for head, rs in runs.items()
        }
        for head, medians in out["trials"][number].items():
            print(number, head, {k: round(v, 3) for k, v in medians.items()})
    greedy_head.set_screening(decoded, args.heads[0] == "auto")
    with torch.autograd.profiler.profile() as prof:
        replay(args.trials[0])
    ops = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ops)
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    out["profile_top_ops"] = {e.key: round(e.self_cpu_time_total / total, 4) for e in top}
    print(out["profile_top_ops"])
    write_json_atomic(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
