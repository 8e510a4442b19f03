"""Run Heretic 1.4.0 end to end, without a terminal, and report per-trial figures.

Runs INSIDE Heretic's venv (benchmarks/.venv-heretic, see heretic_env.py) as a
subprocess of compare.py; stdlib plus Heretic and its own dependencies only.

    .venv-heretic/bin/python heretic_runner.py JOB.json

How Heretic is driven: its settings go into `<out_dir>/heretic/config.toml` (Heretic
reads `config.toml` from the working directory, so the runner chdirs there and empties
sys.argv, which Heretic would otherwise parse as CLI flags). Then Heretic's own
`heretic.main.run()` runs unchanged: model load, common-response-prefix check,
baseline evaluation, refusal directions, the Optuna study. Only its interactive
prompts are replaced (`prompt_select`, `prompt_path`, ... in `heretic.main`):
the trial menu gets the trial chosen by the job's selection policy, the action
menu gets "Save the model to a local folder", the folder prompt a temporary folder
in out_dir, and `export_strategy = "merge"` makes Heretic merge its LoRA and
save a full HF model. Heretic would then reload the model for the menu; the
runner stops it there (a BaseException raised from `Model.reset_model`), so the
end-to-end time ends when the merged model is on disk. Any other prompt aborts
the run instead of hanging.

Job spec (JSON object):
    model               local HF model folder (HF_HUB_OFFLINE=1 is forced)
    harmful_train       JSON file: list of strings, or of objects with "prompt" or "instruction"
    harmless_train      same; these two compute Heretic's refusal directions
    harmful_eval        same; these two score every trial (refusals, KL)
    harmless_eval       same
    n_trials, n_startup_trials, seed, batch_size, max_response_length   ints
    out_dir             created if missing; its heretic/ subfolder is wiped first
    dtype               optional, default "float32"
    threads             optional torch CPU threads, default: torch's choice
    system_prompt       optional, default Heretic's ("You are a helpful assistant.");
                        null means Heretic's default, "" an empty system turn
    selection           optional selection policy, see select_trial(); default (= our config's
                        export section) {"name": "min_kl_under_target", "refusal_target": 0.1,
                        "fallback": "knee"}
    settings            optional dict of further Heretic settings (config.toml keys)

Output: `<out_dir>/result.json` (written atomically) and the merged model in
`<out_dir>/model/`. result.json keys:
    tool, heretic_version, torch_version, job, settings (Heretic's final settings)
    n_bad_eval, n_good_eval, base_refusals
    trials: [{number, index, state, params, direction_index, parameters,
              refusals, kl, values, seconds, start, end}]
    selected: {number, index, refusals, n, kl, rule_used, policy, offered_by_heretic}
    timings_s: {import, model_load, prefix_check, baseline, directions, study, export, total}
    wall_s (== timings_s.total, runner start to merged model saved)
    ru_maxrss_kb (this process's peak RSS), model_dir, study_journal
"""

import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

T0 = time.perf_counter()

# Everything is local; nothing may reach for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_SELECTION = {"name": "min_kl_under_target", "refusal_target": 0.1, "fallback": "knee"}


class _ExportDone(BaseException):
    """Raised once the merged model is saved, to leave Heretic's menu loop.

    A BaseException, because Heretic catches Exception around each menu action.
    """


def write_json_atomic(obj, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_prompts(path) -> list[str]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and "prompts" in data:
        data = data["prompts"]
    out = []
    for item in data:
        if isinstance(item, str):
            out.append(item)
        elif "prompt" in item:
            out.append(item["prompt"])
        else:
            out.append(item["instruction"])
    if not out:
        raise ValueError(f"no prompts in {path}")
    return out


def write_prompt_dataset(prompts: list[str], folder: Path) -> dict:
    """A local `datasets` folder (train.jsonl, column "text") plus its Heretic spec.

    Heretic's plain-text format is one prompt per line, which would split prompts
    that contain newlines; a JSON-lines dataset keeps every prompt byte for byte.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in prompts)
    return {"dataset": str(folder), "split": f"train[:{len(prompts)}]", "column": "text"}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def heretic_settings(job: dict, work: Path) -> dict:
    data = work / "data"
    settings = {
        "model": str(Path(job["model"]).resolve()),
        "dtypes": [job.get("dtype", "float32")],
        "batch_size": int(job["batch_size"]),
        "max_response_length": int(job["max_response_length"]),
        "n_trials": int(job["n_trials"]),
        "n_startup_trials": int(job["n_startup_trials"]),
        "seed": int(job["seed"]),
        "export_strategy": "merge",
        "study_checkpoint_dir": str(work / "checkpoints"),
        "bad_prompts": write_prompt_dataset(
            read_prompts(job["harmful_train"]), data / "harmful_train"
        ),
        "good_prompts": write_prompt_dataset(
            read_prompts(job["harmless_train"]), data / "harmless_train"
        ),
        "bad_evaluation_prompts": write_prompt_dataset(
            read_prompts(job["harmful_eval"]), data / "harmful_eval"
        ),
        "good_evaluation_prompts": write_prompt_dataset(
            read_prompts(job["harmless_eval"]), data / "harmless_eval"
        ),
    }
    if job.get("system_prompt") is not None:
        settings["system_prompt"] = job["system_prompt"]
    settings.update(job.get("settings") or {})
    return settings


def write_config_toml(settings: dict, path: Path) -> None:
    # Top-level keys first, tables after: TOML puts every key after a [table] header into it.
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for k, v in settings.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines.extend(f"{kk} = {toml_value(vv)}" for kk, vv in v.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- selection policy (pure stdlib; mirrors abliterate.selection.select_trial) --------
#
# Heretic itself leaves the choice to the user. Both tools must be judged on the trial
# the same rule picks, so this is a stdlib copy of our export's rule (the runner cannot
# import our package: it runs in Heretic's venv). compare.py re-runs
# abliterate.selection.select_trial on Heretic's trials and warns if they disagree.


def pareto_front(points: list[dict]) -> list[dict]:
    """Non-dominated points on (rate, kl), both minimised; identical scores all kept;
    sorted by rate, kl, number."""
    front = [
        p
        for p in points
        if not any(
            q["rate"] <= p["rate"]
            and q["kl"] <= p["kl"]
            and (q["rate"] < p["rate"] or q["kl"] < p["kl"])
            for q in points
        )
    ]
    return sorted(front, key=lambda p: (p["rate"], p["kl"], p["number"]))


def knee(front: list[dict]) -> dict:
    """The front's point farthest from the line through its two ends, both axes scaled
    to [0, 1]; ties (fronts of one or two points included) go to the lower trial number."""

    def scaled(key):
        v = [p[key] for p in front]
        lo, span = min(v), max(v) - min(v)
        return [(x - lo) / span if span > 0 else 0.0 for x in v]

    x, y = scaled("rate"), scaled("kl")
    order = sorted(range(len(front)), key=lambda i: (x[i], y[i], front[i]["number"]))
    a, b = order[0], order[-1]
    dx, dy = x[b] - x[a], y[b] - y[a]
    length = math.hypot(dx, dy)
    dist = [
        0.0 if length == 0 else abs(dx * (y[i] - y[a]) - dy * (x[i] - x[a])) / length
        for i in range(len(front))
    ]
    best = max(dist)
    tied = [front[i] for i in range(len(front)) if abs(dist[i] - best) <= 1e-12]
    return min(tied, key=lambda p: p["number"])


def select_trial(points: list[dict], policy: dict | None = None) -> tuple[dict, str]:
    """Pick one trial; returns (point, rule actually used).

    points: dicts with "number", "refusals", "n" (harmful eval prompts) and "kl".
    policy (same keys and defaults as our config's `export` / abliterate.selection):
      name "min_kl_under_target": lowest KL among trials with refusals / n <= refusal_target
          (ties: lower number); if none qualifies, fallback "knee" (see knee(), on the
          Pareto front of refusal rate and KL) or "min_refusals".
      name "min_refusals": fewest refusals, then lowest KL, then lower number.
    """
    policy = {**DEFAULT_SELECTION, **(policy or {})}
    unknown = set(policy) - set(DEFAULT_SELECTION)
    if unknown:
        raise ValueError(f"selection policy: unknown keys {sorted(unknown)}")
    if not points:
        raise ValueError("no complete trials to choose from")
    points = [{**p, "rate": p["refusals"] / p["n"]} for p in points]

    def fewest(ps):
        return min(ps, key=lambda p: (p["rate"], p["kl"], p["number"]))

    if policy["name"] == "min_refusals":
        return fewest(points), "min_refusals"
    if policy["name"] != "min_kl_under_target":
        raise ValueError(f"unknown selection policy {policy['name']!r}")
    ok = [p for p in points if p["rate"] <= float(policy["refusal_target"]) + 1e-12]
    if ok:
        return min(ok, key=lambda p: (p["kl"], p["number"])), "min_kl_under_target"
    if policy["fallback"] == "min_refusals":
        return fewest(points), "min_refusals (fallback)"
    if policy["fallback"] == "knee":
        return knee(pareto_front(points)), "knee (fallback)"
    raise ValueError(f"unknown selection fallback {policy['fallback']!r}")


# --- driving Heretic ------------------------------------------------------------------


class Driver:
    """Answers Heretic's prompts and timestamps its phases."""

    def __init__(self, job: dict, out_dir: Path):
        self.policy = job.get("selection") or DEFAULT_SELECTION
        self.out_dir = out_dir
        self.work = out_dir / "heretic"
        self.tmp_model = out_dir / f".model.{os.getpid()}.tmp"
        self.marks: dict[str, float] = {}
        self.directions_s = 0.0
        self.selected: dict | None = None
        self.n_bad: int | None = None
        self.base_refusals: int | None = None
        self.settings = None
        self.exported = False

    def journal(self) -> Path:
        return next((self.work / "checkpoints").glob("*.jsonl"))

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())

    def install(self) -> None:
        import heretic.main as hm
        from heretic.evaluator import Evaluator
        from heretic.model import Model

        driver = self
        model_init, evaluator_init = Model.__init__, Evaluator.__init__
        residuals_mean, reset_model = Model.get_residuals_mean, Model.reset_model

        def timed_model_init(self, settings):
            driver.mark("model_load_start")
            model_init(self, settings)
            driver.mark("model_load_end")

        def timed_evaluator_init(self, settings, model):
            driver.mark("baseline_start")
            evaluator_init(self, settings, model)
            driver.mark("baseline_end")
            driver.n_bad = len(self.bad_prompts)
            driver.base_refusals = self.base_refusals
            driver.settings = settings

        def timed_residuals_mean(self, prompts):
            t = time.perf_counter()
            out = residuals_mean(self, prompts)
            driver.directions_s += time.perf_counter() - t
            driver.mark("directions_start")
            driver.marks["directions_end"] = time.perf_counter()
            return out

        def stop_after_export(self):
            if driver.exported:
                raise _ExportDone()
            return reset_model(self)

        Model.__init__ = timed_model_init
        Evaluator.__init__ = timed_evaluator_init
        Model.get_residuals_mean = timed_residuals_mean
        Model.reset_model = stop_after_export
        hm.prompt_select = self.prompt_select
        hm.prompt_path = self.prompt_path
        hm.prompt_text = self.unexpected
        hm.prompt_password = self.unexpected

    def prompt_select(self, message: str, choices: list):
        values = [getattr(c, "value", c) for c in choices]
        if message.startswith("Which trial"):
            self.mark("study_end")
            if self.selected is not None:
                raise RuntimeError("Heretic returned to the trial menu after export")
            # Heretic offers only its own Pareto front (duplicates dropped); choose over all
            # complete trials instead, as our export does. Heretic only reads the returned
            # trial's user_attrs, so any FrozenTrial of the study is a valid answer.
            trials = {
                t.number: t for t in load_study(self.journal()).trials if t.state.name == "COMPLETE"
            }
            points = [
                {
                    "number": n,
                    "refusals": t.user_attrs["refusals"],
                    "n": t.user_attrs["n_bad_prompts"],
                    "kl": t.user_attrs["kl_divergence"],
                }
                for n, t in trials.items()
            ]
            point, rule = select_trial(points, self.policy)
            t = trials[point["number"]]
            self.selected = {
                "number": t.number,
                "index": t.user_attrs["index"],
                "refusals": point["refusals"],
                "n": point["n"],
                "kl": point["kl"],
                "rule_used": rule,
                "policy": {**DEFAULT_SELECTION, **self.policy},
                "offered_by_heretic": [
                    getattr(v, "number", None) for v in values if hasattr(v, "user_attrs")
                ],
            }
            return t
        if message.startswith("What do you want to do"):
            if self.exported:
                raise _ExportDone()
            return "Save the model to a local folder"
        return self.unexpected(message)

    def prompt_path(self, message: str) -> str:
        self.mark("export_start")
        self.exported = True
        if self.tmp_model.exists():
            shutil.rmtree(self.tmp_model)
        return str(self.tmp_model)

    def unexpected(self, message: str, *args, **kwargs):
        raise RuntimeError(f"unexpected Heretic prompt in a non-interactive run: {message!r}")


def load_study(journal: Path):
    """Heretic's study: an Optuna JournalStorage file, study name "heretic"."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    storage = JournalStorage(
        JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal)))
    )
    return optuna.load_study(study_name="heretic", storage=storage)


def read_trials(journal: Path) -> list[dict]:
    study = load_study(journal)
    out = []
    for t in study.trials:
        seconds = None
        if t.datetime_start is not None and t.datetime_complete is not None:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        out.append(
            {
                "number": t.number,
                "index": t.user_attrs.get("index"),
                "state": t.state.name,
                "params": t.params,
                "direction_index": t.user_attrs.get("direction_index"),
                "parameters": t.user_attrs.get("parameters"),
                "refusals": t.user_attrs.get("refusals"),
                "n": t.user_attrs.get("n_bad_prompts"),
                "kl": t.user_attrs.get("kl_divergence"),
                "values": t.values,
                "seconds": seconds,
                "start": t.datetime_start.isoformat() if t.datetime_start else None,
                "end": t.datetime_complete.isoformat() if t.datetime_complete else None,
            }
        )
    return out


def run_job(job: dict) -> dict:
    out_dir = Path(job["out_dir"]).resolve()
    work = out_dir / "heretic"
    if work.exists():
        shutil.rmtree(work)  # a stale checkpoint would make Heretic ask to resume
    work.mkdir(parents=True)
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets-cache")

    settings = heretic_settings(job, work)
    write_config_toml(settings, work / "config.toml")

    t_import = time.perf_counter()
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    from importlib.metadata import version

    import heretic.main as hm

    import_s = time.perf_counter() - t_import

    driver = Driver(job, out_dir)
    driver.install()

    cwd, argv = os.getcwd(), sys.argv
    os.chdir(work)
    sys.argv = ["heretic"]
    t_run = time.perf_counter()
    try:
        hm.run()
    except _ExportDone:
        pass
    finally:
        os.chdir(cwd)
        sys.argv = argv
    t_end = time.perf_counter()
    if driver.selected is None or not driver.exported:
        raise RuntimeError("Heretic finished without a selected and exported trial")

    model_dir = out_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(driver.tmp_model, model_dir)

    journal = driver.journal()
    m = driver.marks
    timings = {
        "import": import_s,
        "model_load": m["model_load_end"] - m["model_load_start"],
        "prefix_check": m["baseline_start"] - m["model_load_end"],
        "baseline": m["baseline_end"] - m["baseline_start"],
        "directions": driver.directions_s,
        "study": m["study_end"] - m["directions_end"],
        "export": t_end - m["export_start"],
        "heretic_run": t_end - t_run,
        "total": t_end - T0,
    }
    return {
        "tool": "heretic",
        "heretic_version": version("heretic-llm"),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "job": job,
        "settings": json.loads(driver.settings.model_dump_json()) if driver.settings else settings,
        "n_bad_eval": driver.n_bad,
        "n_good_eval": len(read_prompts(job["harmless_eval"])),
        "base_refusals": driver.base_refusals,
        "trials": read_trials(journal),
        "selected": driver.selected,
        "timings_s": timings,
        "wall_s": timings["total"],
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "model_dir": str(model_dir),
        "study_journal": str(journal),
    }


def job_main(argv: list[str], run, out_name: str) -> int:
    """``script JOB.json``: run(job) and write its result to ``<out_dir>/<out_name>`` (also used by
    heretic_front.py)."""
    script = Path(argv[0]).name
    if len(argv) != 2:
        sys.stderr.write(f"usage: {script} JOB.json\n")
        return 2
    job = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    result = run(job)
    out = Path(job["out_dir"]) / out_name
    write_json_atomic(result, out)
    sys.stderr.write(f"{script}: wrote {out}\n")
    return 0


def main(argv: list[str]) -> int:
    return job_main(argv, run_job, "result.json")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
