"""The study worker on a real SQLite file: budget, restarts after kills, parallel workers."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time

import optuna
import pytest
from abliterate import selection
from abliterate import study as st
from abliterate.errors import ConfigError, NumericalError
from optuna.trial import TrialState
from study_space import SPACE

N_LAYERS = 8
FAST = {"n_startup_trials": 3, "multivariate": True}  # TPE proper after 3 trials


def cheap_objective(params: dict, number: int) -> dict:
    """A pure function of the parameters: stronger ablation, fewer refusals, more KL."""
    strength = params["attn_out.max_weight"] + params["mlp_down.max_weight"]
    refusals = min(20, max(0, round(20 * (3.0 - strength))))
    kl = 0.05 * strength**2 + 0.01 * params["attn_out.min_weight"]
    return {"refusals": refusals, "kl": kl, "n": 20}


class SlowObjective:
    """cheap_objective after ``delay`` s; call number ``hang_on_call`` (1-based) hangs instead."""

    def __init__(self, delay: float = 0.0, hang_on_call: int | None = None):
        self.delay, self.hang_on_call, self.calls = delay, hang_on_call, 0

    def __call__(self, params: dict, number: int) -> dict:
        self.calls += 1
        time.sleep(600 if self.calls == self.hang_on_call else self.delay)
        return cheap_objective(params, number)


def _worker_process(url, name, n_trials, worker_id, objective, heartbeat, grace):
    st.run_worker(
        url,
        name,
        objective,
        n_trials,
        worker_id=worker_id,
        seed=0,
        sampler_kwargs=FAST,
        n_layers=N_LAYERS,
        heartbeat_interval=heartbeat,
        grace_period=grace,
        progress=False, space=SPACE,
)


def _spawn(*args):
    proc = multiprocessing.get_context("spawn").Process(target=_worker_process, args=args)
    proc.start()
    return proc


def _trials(url, name, storage=None):
    storage = storage or st.make_storage(url, heartbeat_interval=None)
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _wait_for_hang(proc, url, name, n_complete, timeout=60.0):
    """Wait until the worker has ``n_complete`` trials done and a sampled one RUNNING."""
    storage = st.make_storage(url, heartbeat_interval=None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.is_alive(), "worker exited early"
        try:
            trials = _trials(url, name, storage)
        except KeyError:  # the worker has not created the study yet
            trials = []
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        running = [
            t for t in trials if t.state == TrialState.RUNNING and "ablation_params" in t.user_attrs
        ]
        if len(done) >= n_complete and running:
            return running[0]
        time.sleep(0.2)
    raise AssertionError("worker never reached the hanging trial")


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)


def _assert_distinct_complete(trials, n_trials):
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == n_trials
    keys = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(keys)) == len(keys), "a completed trial was repeated"
    return done


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path / 'run' / 'study.sqlite'}", "test-study"


def test_sampler_settings_are_merged_over_the_defaults(tmp_path, monkeypatch):
    # The workflow passes only n_startup_trials: multivariate TPE (the kernel parameters interact)
    # must stay on. It used to be dropped, leaving independent TPE.
    seen = []
    real = st._sampler

    def spy(seed, worker, n_trials_so_far, kwargs):
        seen.append(dict(kwargs))
        return real(seed, worker, n_trials_so_far, kwargs)

    monkeypatch.setattr(st, "_sampler", spy)
    url = f"sqlite:///{tmp_path / 'study.sqlite'}"
    st.run_worker(url, "merged", cheap_objective, 2, sampler_kwargs={"n_startup_trials": 1},
                  n_layers=N_LAYERS, progress=False, space=SPACE)
    assert seen and all(kw == {"n_startup_trials": 1, "multivariate": True, "constant_liar": True} for kw in seen)


def test_study_name_ignores_key_order_and_changes_with_config():
    a = st.study_name("smol", {"seed": 1, "space": {"x": [0, 1]}})
    assert a == st.study_name("smol", {"space": {"x": [0, 1]}, "seed": 1})
    assert a != st.study_name("smol", {"seed": 2, "space": {"x": [0, 1]}})
    assert a.startswith("smol-")


def test_storage_urls(tmp_path):
    assert (
        st.sqlite_path("sqlite:///results/r1/study.sqlite").as_posix() == "results/r1/study.sqlite"
    )
    assert st.sqlite_path("sqlite:////abs/s.db").as_posix() == "/abs/s.db"
    assert st.sqlite_path("sqlite:///:memory:") is None
    assert st.sqlite_path("postgresql://u:p@host/db") is None
    url = f"sqlite:///{tmp_path / 'a' / 's.sqlite'}"
    storage = st.make_storage(url)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.heartbeat_interval == 60
    with sqlite3.connect(tmp_path / "a" / "s.sqlite") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_suggest_params_maps_relative_ranges_to_layers():
    trial = optuna.trial.FixedTrial(
        {
            "direction_scope": "global",
            "direction_index": 0.5,
            "attn_out.max_weight": 1.2,
            "attn_out.max_weight_position": 1.0,
            "attn_out.min_weight": 0.5,
            "attn_out.min_weight_distance": 0.5,
            "mlp_down.max_weight": 1.0,
            "mlp_down.max_weight_position": 0.5,
            "mlp_down.min_weight": 0.0,
            "mlp_down.min_weight_distance": 0.2,
        }
    )
    flat = st.suggest_params(trial, SPACE, n_layers=N_LAYERS)
    assert flat == pytest.approx(
        {
            "direction_index": 3.5,
            "n_directions": 1,  # the default space's one direction, recorded, not sampled
            "attn_out.max_weight": 1.2,
            "attn_out.max_weight_position": 7.0,
            "attn_out.min_weight": 0.6,
            "attn_out.min_weight_distance": 3.5,
            "mlp_down.max_weight": 1.0,
            "mlp_down.max_weight_position": 3.5,
            "mlp_down.min_weight": 0.0,
            "mlp_down.min_weight_distance": 1.4,
        }
    )


def test_suggest_params_stays_in_range_and_samples_per_layer():
    study = optuna.create_study(
        directions=list(st.DIRECTIONS), sampler=optuna.samplers.RandomSampler(0)
    )
    seen = []
    for _ in range(40):
        flat = st.suggest_params(study.ask(), SPACE, n_layers=N_LAYERS)
        seen.append(flat)
        index = flat["direction_index"]
        assert index is None or 0.2 * 7 <= index <= 0.9 * 7
        for kind in ("attn_out", "mlp_down"):
            assert 0.8 <= flat[f"{kind}.max_weight"] <= 1.5
            assert 0.4 * 7 <= flat[f"{kind}.max_weight_position"] <= 7
            assert 0 <= flat[f"{kind}.min_weight"] <= flat[f"{kind}.max_weight"]
            assert 0 < flat[f"{kind}.min_weight_distance"] <= 0.6 * 7
    assert any(f["direction_index"] is None for f in seen)
    assert any(f["direction_index"] is not None for f in seen)


@pytest.mark.parametrize("scopes", [["per_layer"], ["global"]])
def test_one_scope_is_fixed_not_sampled(tmp_path, scopes):
    space = {**SPACE, "direction_index": {**SPACE["direction_index"], "scopes": scopes}}
    study = optuna.create_study(directions=list(st.DIRECTIONS), sampler=optuna.samplers.RandomSampler(0))
    for _ in range(5):
        trial = study.ask()
        flat = st.suggest_params(trial, space, n_layers=N_LAYERS)
        assert "direction_scope" not in trial.params
        # per_layer alone has no use for an index, so TPE is not given a dead parameter
        assert ("direction_index" in trial.params) == (scopes == ["global"])
        assert (flat["direction_index"] is None) == (scopes == ["per_layer"])

    url, name = f"sqlite:///{tmp_path / 's.sqlite'}", "one-scope"
    st.run_worker(url, name, cheap_objective, 3, seed=0, space=space, n_layers=N_LAYERS, progress=False)
    assert set(st.trials_frame(url, name)["direction_scope"]) == set(scopes)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"direction_index": {"low": 0.2, "high": 0.9, "scopes": []}}, "scopes"),
        ({"direction_index": {"low": 0.2, "high": 0.9, "scopes": ["layerwise"]}}, "scopes"),
        ({"direction_index": {"low": 0.9, "high": 0.2}}, "direction_index"),
        ({"components": {"attn_out": {"max_weight": [1, 2]}}}, "missing"),
        (
            {
                "components": {
                    "attn_out": {
                        **SPACE["components"]["attn_out"],
                        "min_weight_distance": [0, 1],
                    }
                }
            },
            "min_weight_distance",
        ),
        (
            {
                "components": {
                    "attn_out": {**SPACE["components"]["attn_out"], "min_weight": [0, 2]}
                }
            },
            "min_weight",
        ),
    ],
)
def test_validate_space_names_the_bad_key(change, key):
    with pytest.raises(ConfigError, match=key):
        st.validate_space({**SPACE, **change})


def test_exact_budget_and_raising_n_trials_continues(db):
    url, name = db
    summary = st.run_worker(
        url,
        name,
        cheap_objective,
        6,
        seed=1,
        sampler_kwargs=FAST,
        n_layers=N_LAYERS,
        progress=False, space=SPACE,
)
    assert summary["n_complete"] == 6 and summary["study_n_complete"] == 6
    first = _assert_distinct_complete(_trials(url, name), 6)
    # Rerunning with the same budget does nothing; a larger budget adds only the difference.
    assert (
        st.run_worker(
            url, name, cheap_objective, 6, sampler_kwargs=FAST, n_layers=N_LAYERS, progress=False, space=SPACE
        )["n_complete"]
        == 0
    )
    st.run_worker(
        url,
        name,
        cheap_objective,
        9,
        seed=1,
        sampler_kwargs=FAST,
        n_layers=N_LAYERS,
        progress=False, space=SPACE,
)
    done = _assert_distinct_complete(_trials(url, name), 9)
    assert [t.params for t in done[:6]] == [t.params for t in first]
    attrs = done[0].user_attrs
    assert {"refusals", "kl", "n", "seconds", "worker", "ablation_params"} <= set(attrs)
    assert done[0].values == [attrs["refusals"], attrs["kl"]]

    df = st.trials_frame(url, name)
    assert len(df) == 9 and (df["state"] == "COMPLETE").all()
    for column in (
        "number",
        "refusals",
        "kl",
        "n",
        "seconds",
        "worker",
        "direction_index",
        "attn_out.max_weight",
        "mlp_down.min_weight_distance",
        "datetime_complete",
    ):
        assert column in df.columns
    stats = st.study_stats(url, name)
    assert stats["n_complete"] == 9 and stats["n_failed"] == 0 and stats["n_running"] == 0
    assert stats["wall_seconds"] >= stats["seconds"] * 0 and stats["seconds"] > 0


def test_failing_trials_are_recorded_and_too_many_raise(db):
    url, name = db

    def flaky(params, number):
        if number in (1, 3):
            raise ValueError(f"boom {number}")
        return cheap_objective(params, number)

    summary = st.run_worker(
        url, name, flaky, 4, sampler_kwargs=FAST, n_layers=N_LAYERS, progress=False, space=SPACE
    )
    assert summary["n_failed"] == 2
    df = st.trials_frame(url, name)
    assert (df["state"] == "COMPLETE").sum() == 4
    assert df.loc[df["state"] == "FAIL", "error"].tolist() == [
        "ValueError: boom 1",
        "ValueError: boom 3",
    ]

    def broken(params, number):
        return {"refusals": 1, "kl": -0.1}

    with pytest.raises(RuntimeError, match="3 trials failed in a row"):
        st.run_worker(
            url, name + "-2", broken, 4, max_failures=2, n_layers=N_LAYERS, progress=False, space=SPACE
        )
    assert st.study_stats(url, name + "-2")["n_failed"] == 3


def test_refusal_constraint_tells_tpe_which_trials_refuse_past_the_target(db):
    url, name = db
    st.run_worker(url, name, cheap_objective, 10, sampler_kwargs=FAST, n_layers=N_LAYERS, progress=False,
                  space=SPACE, refusal_constraint=0.25)
    trials = optuna.load_study(study_name=name, storage=url).get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 10
    for t in trials:
        (value,) = t.constraints.values()
        assert value == pytest.approx(t.values[0] / 20 - 0.25, abs=1e-9)
        assert (value > 0) == (t.values[0] > 5)


def test_a_trial_exactly_at_the_refusal_constraint_is_feasible():
    study = optuna.create_study(directions=list(st.DIRECTIONS))
    for refusals, feasible in ((3, True), (4, False)):
        trial = study.ask()
        # the export's target as a share that rounds
        assert st._finish(study, trial, {}, [refusals, 0.1], st._past_share(refusals, 32, 3 / 32))
        (value,) = study.trials[-1].constraints.values()
        assert (value <= 0) == feasible


def test_refusal_constraint_needs_the_prompt_count_and_a_share(db):
    url, name = db

    def no_n(params, number):
        return {"refusals": 1, "kl": 0.1}

    with pytest.raises(RuntimeError, match="trials failed in a row"):
        st.run_worker(url, name, no_n, 2, max_failures=1, n_layers=N_LAYERS, progress=False, space=SPACE,
                      refusal_constraint=0.1)
    assert "a refusal constraint needs the prompt count" in st.trials_frame(url, name)["error"].iloc[0]
    with pytest.raises(ConfigError, match=r"study.refusal_constraint must be a share in \[0, 1\), got 1.5"):
        st.run_worker(url, name + "-2", cheap_objective, 2, n_layers=N_LAYERS, progress=False, space=SPACE,
                      refusal_constraint=1.5)


def test_surplus_check_counts_lower_numbered_trials():
    study = optuna.create_study(directions=list(st.DIRECTIONS))
    trials = [study.ask() for _ in range(3)]
    assert not st._is_surplus(study, trials[1].number, 2)
    assert st._is_surplus(study, trials[2].number, 2)


def test_resume_after_kill_reasks_the_killed_trial(db):
    url, name = db
    proc = _spawn(url, name, 6, 0, SlowObjective(hang_on_call=3), None, None)
    try:
        killed = _wait_for_hang(proc, url, name, n_complete=2)
    finally:
        _kill(proc)
    assert killed.user_attrs["worker"] == "0"

    st.run_worker(
        url,
        name,
        cheap_objective,
        6,
        worker_id=0,
        sampler_kwargs=FAST,
        n_layers=N_LAYERS,
        progress=False, space=SPACE,
)
    trials = _trials(url, name)
    done = _assert_distinct_complete(trials, 6)
    assert [t.state for t in trials if t.number == killed.number] == [TrialState.FAIL]
    retried = [t for t in done if t.user_attrs.get("retry_of") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_stale_trial_of_a_dead_worker_is_requeued_via_heartbeat(db):
    url, name = db
    proc = _spawn(url, name, 4, "a", SlowObjective(hang_on_call=2), 1, 1)
    try:
        killed = _wait_for_hang(proc, url, name, n_complete=1)
    finally:
        _kill(proc)
    time.sleep(2.5)  # let the heartbeat go stale (grace period 1 s, timestamps in whole seconds)
    st.run_worker(
        url,
        name,
        cheap_objective,
        4,
        worker_id="b",
        sampler_kwargs=FAST,
        n_layers=N_LAYERS,
        heartbeat_interval=1,
        grace_period=1,
        progress=False, space=SPACE,
)
    trials = _trials(url, name)
    done = _assert_distinct_complete(trials, 4)
    assert [t.state for t in trials if t.number == killed.number] == [TrialState.FAIL]
    retried = [t for t in done if t.user_attrs.get("retry_of") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert retried[0].user_attrs["worker"] == "b"


def test_two_worker_processes_share_one_study(db):
    url, name = db
    procs = [_spawn(url, name, 10, w, SlowObjective(delay=0.4), 60, None) for w in (0, 1)]
    for proc in procs:
        proc.join(120)
    assert [p.exitcode for p in procs] == [0, 0], "a worker crashed (database is locked?)"
    trials = _trials(url, name)
    done = _assert_distinct_complete(trials, 10)
    assert {t.user_attrs["worker"] for t in done} == {"0", "1"}
    assert len(trials) == 10, "surplus or failed trials were created"


def test_result_of_a_trial_failed_by_another_worker_is_dropped(db):
    url, name = db
    storage = st.make_storage(url, heartbeat_interval=None)

    def taken_over(params, number):
        if number == 1:  # what a heartbeat check of another worker does to a silent trial
            study = optuna.load_study(study_name=name, storage=storage)
            trial = study.get_trials(deepcopy=False)[number]
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            st._requeue(study, trial)
        return cheap_objective(params, number)

    summary = st.run_worker(
        url, name, taken_over, 3, sampler_kwargs=FAST, n_layers=N_LAYERS, progress=False, space=SPACE
    )
    assert summary["n_complete"] == 3  # the dropped result is not counted
    trials = _trials(url, name)
    done = _assert_distinct_complete(trials, 3)
    assert [t.state for t in trials if t.number == 1] == [TrialState.FAIL]
    assert [t.user_attrs.get("retry_of") for t in done].count(1) == 1


def test_interrupt_fails_and_requeues_the_trial(db):
    url, name = db

    def interrupted(params, number):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        st.run_worker(url, name, interrupted, 3, n_layers=N_LAYERS, progress=False, space=SPACE)
    st.run_worker(url, name, cheap_objective, 3, n_layers=N_LAYERS, progress=False, space=SPACE)
    trials = _trials(url, name)
    assert trials[0].state == TrialState.FAIL
    done = _assert_distinct_complete(trials, 3)
    assert done[0].user_attrs["retry_of"] == 0 and done[0].params == trials[0].params


def test_schema_created_by_another_process_meanwhile_is_tried_again(tmp_path, monkeypatch, caplog):
    # Optuna's check-then-create of its tables races a reader that does not take our lock (a test
    # polling the study did, and the worker died with "table study_directions already exists").
    import sqlalchemy.exc

    real = optuna.storages.RDBStorage
    calls = []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            real(url)  # the other process creates the schema ...
            raise sqlalchemy.exc.OperationalError(  # ... after our check, before our create
                "CREATE TABLE study_directions", {}, sqlite3.OperationalError("table study_directions already exists"))
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    with caplog.at_level("WARNING", logger=st.logger.name):
        storage = st.make_storage(url)
    assert len(calls) == 2 and "another process was creating the study schema" in caplog.text
    monkeypatch.undo()  # optuna checks isinstance(storage, RDBStorage)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert st.load_or_create_study(storage, "s").study_name == "s"


def test_other_storage_errors_are_not_retried(tmp_path, monkeypatch):
    import sqlalchemy.exc

    calls = []

    def broken(url, **kwargs):
        calls.append(url)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="disk I/O error"):
        st.make_storage(f"sqlite:///{tmp_path / 's.sqlite'}")
    assert len(calls) == 1


def test_server_urls_pass_through_unchanged(monkeypatch):
    seen = {}

    class FakeStorage:
        def __init__(self, url, **kwargs):
            seen.update(url=url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", FakeStorage)
    url = "postgresql://user:pw@db.example/optuna"
    st.make_storage(url, heartbeat_interval=30, grace_period=90)
    assert seen["url"] == url and seen["engine_kwargs"] == {}
    assert seen["heartbeat_interval"] == 30 and seen["grace_period"] == 90


def test_refusal_cap_takes_the_fewest_refusals_among_trials_with_lower_kl(db):
    url, name = db
    study = st.load_or_create_study(st.make_storage(url, None, None), name)
    for refusals, kl, attrs in [
        (5, 0.10, {"n": 20}),
        (3, 0.20, {"n": 20}),
        (3, 0.15, {"n": 20}),
        (1, 0.05, {"n": 20, st.DOMINATED_BY: 0}),  # a lower bound: never a reference
        (0, 0.01, {"n": 30}),  # other prompts: not comparable
    ]:
        trial = study.ask()
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        study.tell(trial, [refusals, kl])
    cap = st.refusal_cap(study)
    assert cap(0.10, 20) is None  # KL must be strictly lower
    assert cap(0.12, 20) == (5, 0)
    assert cap(0.18, 20) == (3, 2)  # fewest refusals; of the two with 3, the lower KL
    assert cap(0.5, 20) == (3, 2)
    assert cap(0.5, 30) == (0, 4)


class CappedObjective:
    """cheap_objective that, given a refusal cap it reaches, reports the cap as a lower bound."""

    def __init__(self):
        self.caps = []

    def __call__(self, params: dict, number: int, refusal_cap=None) -> dict:
        result = cheap_objective(params, number)
        cap = refusal_cap(result["kl"], result["n"]) if refusal_cap else None
        self.caps.append(cap)
        if cap is not None and result["refusals"] >= cap[0]:
            result = dict(result, refusals=cap[0], dominated_by=cap[1])
        return result


def test_stopping_dominated_trials_keeps_the_front_and_the_samplers_path(tmp_path):
    runs = {}
    for stop in (False, True):
        url = f"sqlite:///{tmp_path / f'stop-{stop}.sqlite'}"
        objective = CappedObjective()
        st.run_worker(url, "s", objective, 24, seed=3, sampler_kwargs=FAST, n_layers=N_LAYERS,
                      progress=False, stop_dominated=stop, space=SPACE)
        runs[stop] = (st.trials_frame(url, "s"), st.study_stats(url, "s"), objective.caps)
    (full, full_stats, no_caps), (cut, cut_stats, caps) = runs[False], runs[True]
    assert no_caps == [None] * 24 and any(caps)
    params = [c for c in full.columns if c.startswith(("attn_out.", "mlp_down.", "direction"))]
    # The sampler's good group comes from the front, which stopped trials never join.
    assert full[params].equals(cut[params])
    stopped = cut["dominated_by"].notna()
    assert 0 < stopped.sum() == cut_stats["n_dominated"] and full_stats["n_dominated"] == 0
    assert full["dominated_by"].isna().all() and str(cut["dominated_by"].dtype) == "Int64"
    assert (cut.loc[stopped, "refusals"] <= full.loc[stopped, "refusals"]).all()
    assert cut.loc[~stopped, ["refusals", "kl"]].equals(full.loc[~stopped, ["refusals", "kl"]])
    front = selection.pareto_front(cut)["number"].tolist()
    assert front == selection.pareto_front(full)["number"].tolist()
    by_number = cut.set_index("number")
    truth = full.set_index("number")["refusals"]
    for number, row in by_number[by_number["dominated_by"].notna()].iterrows():
        ref = by_number.loc[int(row["dominated_by"])]  # dominates the trial's full result
        assert ref["kl"] < row["kl"] and ref["refusals"] <= truth[number]


def test_tensor_results_are_stored_as_plain_numbers():
    import torch

    refusals, kl, attrs = st._check_result({"refusals": torch.tensor(3), "kl": torch.tensor(0.25),
                                            "per_prompt": torch.tensor([0.5, 0.0])})
    assert (refusals, kl, attrs["per_prompt"]) == (3, 0.25, [0.5, 0.0])
    assert type(refusals) is int and type(kl) is float


@pytest.mark.parametrize("kl", [-4.3e-9, -2.3e-8, 0.0])
def test_a_kl_at_zero_within_rounding_is_a_result(kl):
    """An edit that leaves the KL prompts' first tokens as they were measures zero as a rounding
    error either side of it: the study takes it as computed (300 tiny-model trials failed two this
    way), as kl.kl_divergence does."""
    assert st._check_result({"refusals": 0, "kl": kl})[1] == kl


@pytest.mark.parametrize("kl", [-1e-3, float("nan"), float("inf")])
def test_a_kl_beyond_rounding_fails_the_trial(kl):
    with pytest.raises(NumericalError):
        st._check_result({"refusals": 0, "kl": kl})


def test_a_trial_left_running_without_a_worker_id_is_failed_on_restart(db, monkeypatch):
    """A worker killed (or cut off from its database server) between asking a trial and recording
    its id in it leaves a RUNNING trial no heartbeat ever fails; a restart fails it, else it would
    hold a place in n_trials for good and the study would never complete."""
    url, name = db
    study = st.load_or_create_study(st.make_storage(url), name)
    orphan = study.ask()  # no "worker" attribute: its worker died right after asking
    monkeypatch.setattr(st, "ORPHAN_SECONDS", 0.0)
    st.run_worker(url, name, cheap_objective, 4, worker_id=1, sampler_kwargs=FAST, n_layers=N_LAYERS,
                  progress=False, space=SPACE)
    trials = _trials(url, name)
    _assert_distinct_complete(trials, 4)
    assert [t.state for t in trials if t.number == orphan.number] == [TrialState.FAIL]
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_a_young_trial_without_a_worker_id_is_left_to_its_worker(db):
    """Within ORPHAN_SECONDS of asking, the trial may belong to a live worker about to record its id."""
    url, name = db
    study = st.load_or_create_study(st.make_storage(url), name)
    young = study.ask()
    st.run_worker(url, name, cheap_objective, 3, worker_id=1, sampler_kwargs=FAST, n_layers=N_LAYERS,
                  progress=False, space=SPACE)
    assert [t.state for t in _trials(url, name) if t.number == young.number] == [TrialState.RUNNING]
