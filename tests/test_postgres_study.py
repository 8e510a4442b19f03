"""The study on a real PostgreSQL server (tests/postgres_server.py: initdb in a temporary folder,
127.0.0.1, a free port), run by real Snakemake processes on the tiny random model.

Each "node" is its own working folder (a copy of one template taken up to the directions, so the
upstream rules run once for the module) that shares nothing with the others but the database URL
in ``study.storage``: exactly what two machines sharing only the database server see. Each test
gets a fresh database on the one server. Skips, naming the install commands, where PostgreSQL or
psycopg is missing; the SLURM test also skips as tests/slurm_cluster.py does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import workflow_runner as wr
import yaml
from postgres_server import postgres_server  # noqa: F401  (a module fixture: one server here)
from tiny_tokenizer import tiny_model_dir

pytestmark = pytest.mark.slow

RES = "results/tiny"
UPSTREAM = [f"{RES}/directions.safetensors", f"{RES}/baseline/logprobs.safetensors", f"{RES}/baseline/metrics.json"]
WORKER = f"{RES}/study/worker-{{}}.json"
N_TRIALS = 6  # a study both nodes finish
LIVE_TRIALS = 40  # a study that outlives a node's start-up, so it can be killed mid-study


# ---------------------------------------------------------------------------------------- helpers


def _trials(url: str) -> list[dict]:
    """Every trial of the database's one study: number, state, params, worker, retry_of; read with
    psycopg directly (as a monitoring script would), never through Optuna."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=10) as conn:
        exists = conn.execute("SELECT to_regclass('public.trials')").fetchone()[0]
        if exists is None:
            return []
        rows = conn.execute("SELECT trial_id, number, state::text FROM trials ORDER BY number").fetchall()
        params: dict[int, set] = {}
        for trial_id, name, value in conn.execute("SELECT trial_id, param_name, param_value FROM trial_params"):
            params.setdefault(trial_id, set()).add((name, value))
        attrs: dict[int, dict] = {}
        for trial_id, key, value in conn.execute("SELECT trial_id, key, value_json FROM trial_user_attributes"):
            attrs.setdefault(trial_id, {})[key] = json.loads(value)
    return [{"number": number, "state": state, "params": frozenset(params.get(tid, ())),
             "worker": attrs.get(tid, {}).get("worker"), "retry_of": attrs.get(tid, {}).get("retry_of")}
            for tid, number, state in rows]


def _complete(url: str) -> dict[int, frozenset]:
    return {t["number"]: t["params"] for t in _trials(url) if t["state"] == "COMPLETE"}


def _assert_study(url: str, n_trials: int) -> dict[int, frozenset]:
    """Exactly ``n_trials`` COMPLETE trials with distinct parameters, none left RUNNING."""
    trials = _trials(url)
    done = _complete(url)
    assert len(done) == n_trials, trials
    assert len(set(done.values())) == n_trials, "a completed trial ran twice"
    assert not [t for t in trials if t["state"] == "RUNNING"], trials
    return done


def _node(template: Path, workdir: Path, model_path: Path, url: str | None, n_trials: int) -> Path:
    """A working folder of its own (as on another machine): the template's upstream outputs and a
    config whose study.storage is ``url`` (None: left to --config)."""
    shutil.copytree(template, workdir, symlinks=True)  # copy2 keeps the mtimes: nothing reruns upstream
    study = {"n_trials": n_trials, "n_startup_trials": 2, "workers": 2}
    if url is not None:
        study["storage"] = url
    wr.write_config(workdir, wr.tiny_config(model_path, study=study))
    return workdir


def _finished(proc: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        wr.kill(proc)
        raise AssertionError(f"still running after {timeout} s:\n{log.read_text()[-3000:]}") from None


def _wait_for(condition, procs: list[subprocess.Popen], log: Path, what: str, poll: float = 0.02) -> None:
    deadline = time.time() + 300
    while not condition():
        assert all(p.poll() is None for p in procs), f"ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} in 300 s"
        time.sleep(poll)


def _quiet(url: str):
    """``_trials`` that answers [] while the schema is being created."""
    with contextlib.suppress(Exception):
        return _trials(url)
    return []


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("pg-model") / "model")


@pytest.fixture(scope="module")
def template(postgres_server, tmp_path_factory, model_path) -> Path:  # noqa: F811
    """Prompts, baseline and directions of the tiny run, made once (the study's storage plays no
    part upstream). The server fixture comes first so that a missing server skips before this."""
    wd = tmp_path_factory.mktemp("pg-template") / "wd"
    wr.write_config(wd, wr.tiny_config(model_path))
    wr.run(wd, *UPSTREAM)
    return wd


# ---------------------------------------------------------------------------------------- tests


def test_two_nodes_share_one_study_then_more_trials_continue_it(postgres_server, template, model_path,  # noqa: F811
                                                                tmp_path):
    """Two Snakemake processes in two folders, one worker each, fill one study to exactly n_trials;
    then one node's full run (its other worker finds the study complete) writes trials.csv, and a
    raised n_trials continues the same study."""
    url = postgres_server.new_database("two_nodes")
    a = _node(template, tmp_path / "a", model_path, url, N_TRIALS)
    b = _node(template, tmp_path / "b", model_path, None, N_TRIALS)  # its storage given by --config
    on_b = ["--config", f'study={{storage: "{url}"}}']
    procs = [wr.start(a, WORKER.format(0), output=tmp_path / "a.log"),
             wr.start(b, WORKER.format(1), *on_b, output=tmp_path / "b.log")]
    for proc, log in zip(procs, ("a.log", "b.log")):
        assert _finished(proc, tmp_path / log) == 0, (tmp_path / log).read_text()[-4000:]
    first = _assert_study(url, N_TRIALS)

    wr.run(a, f"{RES}/trials.csv")
    table = pd.read_csv(a / RES / "trials.csv")
    assert (table["state"] == "COMPLETE").sum() == N_TRIALS
    assert json.loads((a / WORKER.format(1)).read_text())["n_complete"] == 0  # found the study complete

    cfg = yaml.safe_load((a / "config.yaml").read_text())
    cfg["study"]["n_trials"] = N_TRIALS + 3
    wr.write_config(a, cfg)
    rerun = wr.run(a, f"{RES}/trials.csv")
    assert "rule directions:" not in rerun.stderr
    more = _assert_study(url, N_TRIALS + 3)
    assert first.items() <= more.items()  # the same study, its trials kept


def test_a_node_killed_mid_trial_resumes_without_losing_or_repeating_trials(postgres_server, template,  # noqa: F811
                                                                            model_path, tmp_path):
    """Node b's Snakemake (and its study job) is SIGKILLed while its worker runs a trial; node a
    goes on alone. After ``--unlock``, b's rerun re-asks the killed trial's parameters and the
    study ends with exactly n_trials, every trial completed before the kill kept."""
    url = postgres_server.new_database("killed_node")
    a = _node(template, tmp_path / "a", model_path, url, LIVE_TRIALS)
    b = _node(template, tmp_path / "b", model_path, url, LIVE_TRIALS)
    pa = wr.start(a, WORKER.format(0), output=tmp_path / "a.log")
    pb = wr.start(b, WORKER.format(1), output=tmp_path / "b.log")
    try:
        def b_mid_trial() -> bool:
            trials = _quiet(url)
            return (any(t["worker"] == "1" and t["state"] == "COMPLETE" for t in trials)
                    and any(t["worker"] == "1" and t["state"] == "RUNNING" and t["params"] for t in trials))

        _wait_for(b_mid_trial, [pa, pb], tmp_path / "b.log", "trial of node b running")
        wr.kill(pb)
        killed = [t for t in _trials(url) if t["worker"] == "1" and t["state"] == "RUNNING"]
        before = _complete(url)
        assert _finished(pa, tmp_path / "a.log") == 0, (tmp_path / "a.log").read_text()[-4000:]
    finally:
        for proc in (pa, pb):
            if proc.poll() is None:
                wr.kill(proc)
    assert len(killed) == 1 and killed[0]["params"], "the kill missed node b's trial"
    # a stopped with the killed trial still RUNNING: it counts towards n_trials until b is back
    assert len(_complete(url)) == LIVE_TRIALS - 1

    wr.run(b, "--unlock")
    wr.run(b, WORKER.format(1), "--rerun-incomplete")
    after = _assert_study(url, LIVE_TRIALS)
    assert before.items() <= after.items()  # nothing completed was lost or run again
    trials = {t["number"]: t for t in _trials(url)}
    assert trials[killed[0]["number"]]["state"] == "FAIL"
    retried = [t for t in trials.values() if t["retry_of"] == killed[0]["number"]]
    assert [t["state"] for t in retried] == ["COMPLETE"]
    assert killed[0]["params"] <= retried[0]["params"]  # the same parameters, asked again
    assert {t["worker"] for t in trials.values() if t["state"] == "COMPLETE"} == {"0", "1"}


def test_server_stopped_mid_study_fails_clearly_then_rerun_loses_nothing(postgres_server, template,  # noqa: F811
                                                                         model_path, tmp_path):
    url = postgres_server.new_database("server_stopped")
    a = _node(template, tmp_path / "a", model_path, url, LIVE_TRIALS)
    proc = wr.start(a, WORKER.format(0), output=tmp_path / "a.log")
    try:
        _wait_for(lambda: sum(t["state"] == "COMPLETE" for t in _quiet(url)) >= 2, [proc], tmp_path / "a.log",
                  "completed trials")
        postgres_server.stop("immediate")  # a crash: no shutdown checkpoint
        returncode = _finished(proc, tmp_path / "a.log", timeout=300)
    finally:
        if proc.poll() is None:
            wr.kill(proc)
        if not postgres_server.running():
            postgres_server.start()
    assert returncode != 0
    log = (a / "results/logs/tiny/study-0.log").read_text()
    assert "study.storage: the study database" in log and "stopped answering" in log, log[-4000:]
    assert postgres_server.password not in log
    before = _complete(url)
    assert 0 < len(before) < LIVE_TRIALS

    wr.run(a, WORKER.format(0))
    after = _assert_study(url, LIVE_TRIALS)
    assert before.items() <= after.items()


@pytest.mark.parametrize("fault", ["wrong_password", "no_server_on_port", "no_database"])
def test_unusable_storage_fails_before_any_job_naming_study_storage(postgres_server, template,  # noqa: F811
                                                                    model_path, tmp_path, fault):
    from postgres_server import _free_port

    url = {"wrong_password": postgres_server.url("postgres", password="not-the-password"),
           "no_server_on_port": postgres_server.url("postgres", port=_free_port()),
           "no_database": postgres_server.url("no_such_database")}[fault]
    a = _node(template, tmp_path / "a", model_path, url, N_TRIALS)
    shutil.rmtree(a / "results/logs")
    started = time.time()
    proc = wr.run(a, f"{RES}/trials.csv", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "study.storage: cannot connect to" in output, output[-3000:]
    assert {"wrong_password": "password authentication failed", "no_server_on_port": "Connection refused",
            "no_database": 'database "no_such_database" does not exist'}[fault] in output
    assert "not-the-password" not in output
    assert "rule study:" not in output and not (a / "results/logs").exists()  # no job started
    assert time.time() - started < 60


def test_tiny_study_through_the_slurm_profile_on_postgres(postgres_server, template, model_path,  # noqa: F811
                                                          tmp_path, slurm_cluster):
    from slurm_cluster import run_snakemake_on_slurm, submitted_job_ids

    url = postgres_server.new_database("slurm")
    a = _node(template, tmp_path / "a", model_path, url, 2)
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    cfg["study"].update(workers=1, n_startup_trials=1)
    wr.write_config(a, cfg)
    os.environ.setdefault("ABLITERATE_DEVICE", "cpu")  # the helper passes this environment to the jobs
    proc = run_snakemake_on_slurm(
        a, wr.REPO / "Snakefile", ["--configfile", str(a / "config.yaml"), "--max-threads", "2", f"{RES}/trials.csv"],
        timeout=600, cluster=slurm_cluster,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert {"study", "trials"} <= set(submitted_job_ids(proc.stdout + proc.stderr))
    _assert_study(url, 2)
