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

``--heretic RESULT.json`` does the same for Heretic's front in a ``compare.py`` result file (its
trials' parameters, settings and the prompt splits are in the file): ``heretic_front.py`` re-applies
each front trial with Heretic's own code in its venv and saves it as a LoRA adapter, and each
adapter on the base model is measured here with the same evaluator. The file does not hold the
prompts: ``--work`` is then a working folder of ours with the same seed, whose prompt splits are the
run's (the splits are a function of the seed); the adapters go to its ``heretic-front/``. Heretic's
chosen trial must reproduce the file's held-out figures for Heretic, prompt by prompt (checked).

    python benchmarks/heldout_front.py --heretic benchmarks/results/cpu-demo-...-seed45-shipped.json \
        --work benchmarks/work/cpu-demo-seed45 --out FILE
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
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


def _measure_each(protocol: compare.Protocol, model: str, splits: dict, trials: list[dict], split: str,
                  edits) -> dict:
    """The base model's figures on ``split``, then each trial's, added to ``trials`` under the split's
    name. ``edits(lm)`` returns ``edited(trial)``: a context manager giving the model with the trial's
    edit, undone on exit, so every trial starts from the base weights."""
    import torch
    from abliterate import session
    from tqdm import tqdm

    if protocol.threads:
        torch.set_num_threads(protocol.threads)
    config = compare.eval_config(protocol)
    lm = session.open_model(config, path=model)
    prompts = compare.heldout_prompts(config, lm, protocol, splits, split)
    base, base_lp = compare.measure_heldout(lm, *prompts)
    edited = edits(lm)
    for trial in tqdm(trials, desc=f"{split} trials", unit="trial"):
        with edited(trial) as view:
            trial[split], _ = compare.measure_heldout(view, *prompts, base_lp)
        logger.info("trial %d: eval %d/%d KL %.4f -> %s %d/%d KL %.4f", trial["number"],
                    trial["eval"]["refusals"], trial["eval"]["n"], trial["eval"]["kl"], split,
                    trial[split]["refusals"], trial[split]["n"], trial[split]["kl"])
    return {"split": split, "base": {k: base[k] for k in ("refusals", "n")}, "trials": trials}


def measure(protocol: compare.Protocol, model: str, ours_dir: Path, run: str, trials: list[dict],
            split: str = "heldout") -> dict:
    """The figures on ``split`` of the base model and of each trial of our run re-applied to it."""
    import yaml
    from abliterate import ablation, io, rule_settings
    from abliterate.steps.study import build_editor
    from snakemake.utils import validate

    run_config = yaml.safe_load((ours_dir / "config.yaml").read_text(encoding="utf-8"))
    validate(run_config, str(compare.REPO / "workflow" / "schemas" / "config.schema.yaml"))
    run_config = rule_settings.typed("export", rule_settings.settings(run_config, "export"))

    def edits(lm):
        # the run's own ablation settings (row norm, rank, seed, route), as its study applied them
        ablator = build_editor(run_config, lm, ours_dir / "results" / run / "directions.safetensors")

        @contextmanager
        def edited(trial):
            ablator.apply(ablation.AblationParams.from_flat(trial["params"]))
            try:
                yield lm
            finally:
                ablator.reset()

        return edited

    result = _measure_each(protocol, model, compare.workflow_splits(ours_dir, run), trials, split, edits)
    return {"run_config_hash": io.config_hash(run_config), **result}


def heretic_front_trials(result: dict, everything: bool) -> list[dict]:
    """Heretic's COMPLETE trials of a compare.py result file (front only unless ``everything``) with
    the parameters Heretic stored on each."""
    from abliterate import selection

    heretic = result["raw"]["heretic"]
    complete = [t for t in heretic["trials"] if t["state"] == "COMPLETE"]
    df = compare.trials_table(complete, heretic.get("n_bad_eval"))
    keep = set(df["number"] if everything else selection.pareto_front(df)["number"])
    return [
        {
            "number": t["number"],
            "eval": {"refusals": int(t["refusals"]), "n": int(t["n"]), "kl": float(t["kl"])},
            "direction_index": t["direction_index"],
            "parameters": t["parameters"],
        }
        for t in sorted(complete, key=lambda t: (t["refusals"], t["kl"]))
        if t["number"] in keep
    ]


def heretic_adapters(protocol: compare.Protocol, model: str, result: dict, splits: dict, trials: list[dict],
                     work: Path, python: str | None) -> dict[int, str]:
    """Each trial saved as Heretic's LoRA adapter by heretic_front.py in Heretic's venv: number -> folder."""
    python = compare.heretic_python(python)
    heretic = result["raw"]["heretic"]
    out_dir = work / "adapters"
    job = {**compare.heretic_job(protocol, model, splits, work, out_dir),
           "run_settings": heretic["settings"],
           "trials": [{k: t[k] for k in ("number", "direction_index", "parameters")} for t in trials]}
    compare.write_json_atomic(job, work / "heretic-front-job.json")
    compare.run_measured([str(python), str(BENCHMARKS / "heretic_front.py"), str(work / "heretic-front-job.json")],
                         cwd=work, log=work / "logs" / "heretic-front.log", env=compare.child_env(protocol.threads))
    saved = json.loads((out_dir / "front.json").read_text(encoding="utf-8"))
    return {int(t["number"]): t["adapter"] for t in saved["trials"]}


def measure_adapters(protocol: compare.Protocol, model: str, splits: dict, trials: list[dict],
                     adapters: dict[int, str], split: str = "heldout") -> dict:
    """Like :func:`measure`, each trial being a PEFT adapter on the base model."""
    from types import SimpleNamespace

    from peft import PeftModel

    def edits(lm):
        @contextmanager
        def edited(trial):
            peft = PeftModel.from_pretrained(lm.model, adapters[trial["number"]])
            try:
                yield SimpleNamespace(model=peft, tokenizer=lm.tokenizer)
            finally:
                lm.model = peft.unload()  # the LoRA layers out again, base weights untouched

        return edited

    return _measure_each(protocol, model, splits, trials, split, edits)


def check_heretic_choice(result: dict, trials: list[dict], split: str) -> str:
    """Heretic's chosen trial, re-applied, against the held-out figures of its merged model in the file."""
    chosen = result["raw"]["heretic"]["selected"]["number"]
    row = next((t for t in trials if t["number"] == chosen), None)
    if split != "heldout" or row is None:
        return "no check (the chosen trial is not among these, or another split)"
    want = result["heldout_per_prompt"]["heretic"]
    got = row[split]
    same_refusals = got["refused"] == want["refused"]
    kl_diff = abs(got["kl"] - sum(want["kl"]) / len(want["kl"]))
    msg = (f"chosen trial {chosen}: {got['refusals']}/{got['n']} at KL {got['kl']:.4f} as an adapter; "
           f"merged model in the file: {sum(want['refused'])}/{len(want['refused'])}, per-prompt refusals "
           f"{'identical' if same_refusals else 'DIFFERENT'}, KL difference {kl_diff:.1e}")
    if not same_refusals or kl_diff > 1e-3:
        raise SystemExit(f"re-applied Heretic trial does not reproduce the run: {msg}")
    return msg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True,
                    help="a compare.py working folder with our run (with --heretic: one of the same seed)")
    ap.add_argument("--heretic", type=Path, metavar="RESULT",
                    help="measure Heretic's front in this compare.py result file instead of our run's")
    ap.add_argument("--heretic-python", help="an interpreter that imports heretic (default: its venv)")
    ap.add_argument("--protocol", default="cpu-demo", choices=sorted(compare.PROTOCOLS))
    ap.add_argument("--model", help="base model folder (default: the protocol's)")
    ap.add_argument("--all", action="store_true", help="every complete trial, not only the front")
    ap.add_argument("--split", default="heldout", choices=compare.SPLITS,
                    help="prompts to measure on (train: those the directions came from, a selection check)")
    ap.add_argument("--out", type=Path, help="result JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    protocol = compare.PROTOCOLS[args.protocol]
    model = args.model or protocol.model
    split = args.split
    check = None
    if args.heretic:
        source = json.loads(args.heretic.read_text(encoding="utf-8"))
        if source.get("protocol") != args.protocol:
            raise SystemExit(f"{args.heretic} is a {source.get('protocol')!r} result, not {args.protocol!r}")
        protocol = compare.replace(protocol, seed=source["settings"]["seed"])
        trials = heretic_front_trials(source, args.all)
        splits = compare.workflow_splits(args.work.resolve() / "ours", f"bench-{args.protocol}")
        adapters = heretic_adapters(protocol, model, source, splits, trials, args.work.resolve() / "heretic-front",
                                    args.heretic_python)
        result = {"tool": "heretic", "source": str(args.heretic),
                  "chosen": int(source["raw"]["heretic"]["selected"]["number"]),
                  **measure_adapters(protocol, model, splits, trials, adapters, split)}
        check = check_heretic_choice(source, trials, split)
    else:
        ours_dir = args.work.resolve() / "ours"
        run = f"bench-{args.protocol}"
        selected = ours_dir / "results" / run / "selected.json"
        result = {"tool": "ours",
                  "chosen": int(json.loads(selected.read_text(encoding="utf-8"))["number"]) if selected.is_file() else None,
                  **measure(protocol, model, ours_dir, run, front_trials(ours_dir, run, args.all), split)}
    trials = result["trials"]
    label = "held-out" if split == "heldout" else split
    print(f"{'trial':>5}  {'eval':>12}  {label:>12}")
    for t in trials:
        e, h = t["eval"], t[split]
        print(f"{t['number']:>5}  {e['refusals']:>3}/{e['n']} {e['kl']:.3f}  {h['refusals']:>3}/{h['n']} {h['kl']:.3f}")
    hv = {
        split: compare.hypervolume_2d(
            [(t[split]["refusals"] / t[split]["n"], t[split]["kl"]) for t in trials], compare.REF_POINT
        )
        for split in ("eval", split)
    }
    print(f"hypervolume of these trials, ref {compare.REF_POINT}: eval {hv['eval']:.4f}, {label} {hv[split]:.4f}")
    if check:
        print(check)
    if args.out:
        import datetime as dt

        compare.write_json_atomic({"work": str(args.work), "protocol": args.protocol, "model": str(model),
                                   "date": dt.datetime.now(dt.timezone.utc).isoformat(),
                                   "hypervolume": hv, **result}, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
