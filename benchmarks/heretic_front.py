"""Heretic's trials of a finished benchmark run, re-applied and saved as LoRA adapters.

Runs INSIDE Heretic's venv (benchmarks/.venv-heretic), like heretic_runner.py, as a subprocess of
``heldout_front.py --heretic``; stdlib plus Heretic and its dependencies only.

    .venv-heretic/bin/python heretic_front.py JOB.json

A run's result file keeps each Heretic trial's parameters (``direction_index`` and the per-component
``parameters`` Heretic stores on the trial) and Heretic's final settings, but not its model. Heretic's
edit is a function of those and of its refusal directions, which it computes deterministically from
the train prompts. So this loads the model with Heretic's own ``Model`` and the run's settings, takes
the difference of the mean residuals of the harmful and harmless train prompts the way Heretic's
``main`` does (normalised; with ``orthogonalize_direction``, projected off the harmless mean), and for
each trial lets Heretic's own ``Model.abliterate`` write its LoRA factors, then saves the adapter.
Heretic edits through LoRA only, so base model + adapter is the model Heretic would merge.
``heldout_front.py`` checks that: its chosen trial must reproduce the run's held-out figures.

Job spec (JSON object):
    model, harmful_train, harmless_train, dtype, threads   as in heretic_runner.py's job
    run_settings    Heretic's final settings of the run (result.json "settings"), prompt paths
                    replaced here; they carry the response prefix and batch size the run found
    trials          [{number, direction_index, parameters}]
    out_dir         adapters go to out_dir/trial-<number>/; out_dir/front.json lists them
"""

import os
import sys
import time
from pathlib import Path

import heretic_runner as hr


def directions(model, settings):
    """Heretic's refusal directions, (layers + 1, hidden), from the run's train prompts."""
    import torch.nn.functional as F
    from heretic.utils import load_prompts

    harmless = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
    harmful = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
    out = F.normalize(harmful - harmless, p=2, dim=1)
    if settings.orthogonalize_direction:
        # only the part orthogonal to the harmless mean, as the run's setting asked
        unit = F.normalize(harmless, p=2, dim=1)
        out = F.normalize(out - (out * unit).sum(dim=1, keepdim=True) * unit, p=2, dim=1)
    return out


def run_job(job: dict) -> dict:
    from importlib.metadata import version

    import torch

    out_dir = Path(job["out_dir"]).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    from heretic.config import Settings
    from heretic.model import AbliterationParameters, Model

    data = out_dir / "data"
    raw = dict(job["run_settings"])
    for key, name in (("bad_prompts", "harmful_train"), ("good_prompts", "harmless_train")):
        prompts = hr.read_prompts(job[name])
        raw[key] = {**raw[key], **hr.write_prompt_dataset(prompts, data / name)}
    raw["model"] = str(Path(job["model"]).resolve())
    # Heretic's settings also read the command line and ./config.toml: give them neither
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = ["heretic"]
    os.chdir(out_dir)
    try:
        settings = Settings.model_validate(raw)
    finally:
        sys.argv = argv
        os.chdir(cwd)

    start = time.perf_counter()
    model = Model(settings)
    table = directions(model, settings)
    load_and_directions_s = time.perf_counter() - start
    saved = []
    for trial in job["trials"]:
        model.reset_model()
        params = {k: AbliterationParameters(**v) for k, v in trial["parameters"].items()}
        model.abliterate(table, trial["direction_index"], params)
        folder = out_dir / f"trial-{trial['number']}"
        model.model.save_pretrained(str(folder))
        saved.append({"number": trial["number"], "adapter": str(folder)})
        sys.stderr.write(f"heretic_front: trial {trial['number']} -> {folder}\n")
    return {"heretic_version": version("heretic-llm"), "load_and_directions_s": load_and_directions_s, "trials": saved}


def main(argv: list[str]) -> int:
    return hr.job_main(argv, run_job, "front.json")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
