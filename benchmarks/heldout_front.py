"""Held-out figures for every trial on our study's Pareto front, not only the chosen one.

``compare.py`` measures the one model each tool chooses on the held-out prompts. One model says
little about how well the eval front predicts behaviour on prompts the study never saw (a trial
chosen at the edge of the refusal target on 50 eval prompts can refuse far more held-out ones), and
nothing about which selection rule generalises. This script re-applies each front trial of a
finished benchmark run of ours (``compare.py --work DIR``) to the base model with the run's own
directions and ablation settings, and measures it on the held-out split with the same evaluator and
settings ``compare.py`` uses; it prints eval against held-out per trial and the held-out
hypervolume of the eval front, and writes JSON (``--out``). The chosen trial's row reproduces the
held-out figures in the run's result file (a check that the re-applied edit is the exported one).

    python benchmarks/heldout_front.py --work benchmarks/work/cpu-demo-seed44 --out FILE
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS.parent / "workflow"))

import compare

logger = logging.getLogger("heldout_front")


def front_trials(ours_dir: Path, run: str, everything: bool) -> list[dict]:
    """COMPLETE trials (front only unless ``everything``) with their flat ablation parameters. A trial
    stopped once dominated (``stop_dominated``) keeps the lower bound of its eval refusals."""
    import optuna
    from abliterate import selection, study
    from abliterate.steps.export import params_of

    url = f"sqlite:///{ours_dir / 'results' / run / 'study.sqlite'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    if len(names) != 1:
        raise SystemExit(f"expected one study in {url}, found {names}")
    df = study.trials_frame(url, names[0])
    keep = df[df["state"] == "COMPLETE"] if everything else selection.pareto_front(df)
    return [
        {
            "number": int(r["number"]),
            "eval": {"refusals": int(r["refusals"]), "n": int(r["n"]), "kl": float(r["kl"])},
            "params": params_of(r),
        }
        for _, r in keep.iterrows()
    ]


def measure(protocol: compare.Protocol, model: str, ours_dir: Path, run: str, trials: list[dict],
            split: str = "heldout") -> dict:
    """The figures on ``split`` of the base model and of each trial re-applied to it (added to
    ``trials`` under the split's name)."""
    import torch
    import yaml
    from abliterate import ablation, io, session
    from abliterate.steps.study import build_ablator
    from tqdm import tqdm

    if protocol.threads:
        torch.set_num_threads(protocol.threads)
    config = compare.eval_config(protocol)
    run_config = yaml.safe_load((ours_dir / "config.yaml").read_text(encoding="utf-8"))
    lm = session.open_model(config, path=model)
    prompts = compare.heldout_prompts(config, lm, protocol, compare.workflow_splits(ours_dir, run), split)
    base, base_lp = compare.measure_heldout(lm, *prompts)
    # the run's own ablation settings (row norm, rank, seed, route), as its study applied them
    ablator = build_ablator(run_config, lm, ours_dir / "results" / run / "directions.safetensors")
    for trial in tqdm(trials, desc=f"{split} trials", unit="trial"):
        ablator.apply(ablation.AblationParams.from_flat(trial["params"]))
        try:
            trial[split], _ = compare.measure_heldout(lm, *prompts, base_lp)
        finally:
            ablator.reset()
        logger.info("trial %d: eval %d/%d KL %.4f -> %s %d/%d KL %.4f", trial["number"],
                    trial["eval"]["refusals"], trial["eval"]["n"], trial["eval"]["kl"], split,
                    trial[split]["refusals"], trial[split]["n"], trial[split]["kl"])
    return {"run_config_hash": io.config_hash(run_config), "split": split,
            "base": {k: base[k] for k in ("refusals", "n")}, "trials": trials}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a compare.py working folder with our run")
    ap.add_argument("--protocol", default="cpu-demo", choices=sorted(compare.PROTOCOLS))
    ap.add_argument("--model", help="base model folder (default: the protocol's)")
    ap.add_argument("--all", action="store_true", help="every complete trial, not only the front")
    ap.add_argument("--split", default="heldout", choices=compare.SPLITS,
                    help="prompts to measure on (train: those the directions came from, a selection check)")
    ap.add_argument("--out", type=Path, help="result JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from abliterate import selection

    protocol = compare.PROTOCOLS[args.protocol]
    model = args.model or protocol.model
    ours_dir = args.work.resolve() / "ours"
    run = f"bench-{args.protocol}"
    split = args.split
    result = measure(protocol, model, ours_dir, run, front_trials(ours_dir, run, args.all), split)
    trials = result["trials"]
    label = "held-out" if split == "heldout" else split
    print(f"{'trial':>5}  {'eval':>12}  {label:>12}")
    for t in trials:
        e, h = t["eval"], t[split]
        print(f"{t['number']:>5}  {e['refusals']:>3}/{e['n']} {e['kl']:.3f}  {h['refusals']:>3}/{h['n']} {h['kl']:.3f}")
    hv = {
        split: selection.hypervolume_2d(
            [(t[split]["refusals"] / t[split]["n"], t[split]["kl"]) for t in trials], compare.REF_POINT
        )
        for split in ("eval", split)
    }
    print(f"hypervolume of these trials, ref {compare.REF_POINT}: eval {hv['eval']:.4f}, {label} {hv[split]:.4f}")
    if args.out:
        import datetime as dt

        compare.write_json_atomic({"work": str(args.work), "protocol": args.protocol, "model": str(model),
                                   "date": dt.datetime.now(dt.timezone.utc).isoformat(),
                                   "hypervolume": hv, **result}, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
