"""Fault injection on the real workflow (Snakemake as a subprocess, the tiny random model): a second
run on a live run's folder, SIGKILL inside a rule, a full disk, damaged files.

Expensive preparation is shared: one workflow run is taken stage by stage in a template folder
(``Stages``) and each test works on a copy of the stage it starts from (``shutil.copytree`` with
``copy2`` keeps the mtimes, so Snakemake sees nothing outdated in the copy).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import ClassVar

import pytest
import workflow_runner as wr
from tiny_tokenizer import tiny_model_dir

pytestmark = pytest.mark.slow

N_TRIALS = 4  # the template's study
RES = "results/tiny"
DB = f"{RES}/study.sqlite"
LOCK_MESSAGE = "Directory cannot be locked"
DISK_FULL = re.compile(r"No space left|disk is full|ENOSPC|Errno 28")


# ---------------------------------------------------------------------------------------- helpers


def _trials(workdir: Path) -> list[tuple[int, str, frozenset]]:
    """(number, state, params) of every trial, read through ``sqlite3`` read-only: works while a
    study job writes, and without Optuna touching the file."""
    uri = f"file:{urllib.parse.quote(str(workdir / DB))}?mode=ro"
    con = sqlite3.connect(uri, uri=True, timeout=30)
    try:
        rows = con.execute("SELECT trial_id, number, state FROM trials ORDER BY number").fetchall()
        params: dict[int, set] = {}
        for trial_id, name, value in con.execute("SELECT trial_id, param_name, param_value FROM trial_params"):
            params.setdefault(trial_id, set()).add((name, value))
    finally:
        con.close()
    return [(number, state, frozenset(params.get(tid, ()))) for tid, number, state in rows]


def _complete(workdir: Path) -> list[frozenset]:
    return [p for _, state, p in _trials(workdir) if state == "COMPLETE"]


def _n_complete_or_none(workdir: Path) -> int | None:
    with contextlib.suppress(Exception):  # not created yet, or mid-write: poll again
        return len(_complete(workdir))
    return None


def _wait_for_a_trial(workdir: Path, proc: subprocess.Popen, log: Path, poll: float) -> None:
    """Until the background run ``proc`` completed its first trial (it must not end before)."""
    deadline = time.time() + 300
    while (_n_complete_or_none(workdir) or 0) < 1:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no trial completed in 300 s"
        time.sleep(poll)


def _assert_study(workdir: Path, n_trials: int) -> None:
    """Exactly ``n_trials`` COMPLETE trials with distinct parameters (nothing lost, none repeated)."""
    done = _complete(workdir)
    assert len(done) == n_trials, _trials(workdir)
    assert len(set(done)) == n_trials, "a completed trial ran twice"
    assert not [t for t in _trials(workdir) if t[1] == "RUNNING"]


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)  # copy2: mtimes kept
    return dest


def _temporaries(workdir: Path) -> list[Path]:
    """Leftovers of atomic writes: ``.<destname>.<random>`` beside a destination under results/."""
    return sorted(p for p in (workdir / "results").rglob(".*") if p.name != ".snakemake_timestamp")


def _job_text(proc: subprocess.CompletedProcess, workdir: Path) -> str:
    """What the failed jobs said: Snakemake's stderr from its first error on, and the job logs
    (the tests delete the template's logs first, so these are this run's)."""
    err = proc.stderr
    cut = min((i for i in (err.find("Error in rule"), err.find("Error:"), err.find("Traceback")) if i >= 0),
              default=len(err))
    logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')}"
                     for p in sorted((workdir / "results/logs").rglob("*.log")))
    return err[cut:] + "\n" + logs


def _locks(workdir: Path) -> list[Path]:
    folder = workdir / ".snakemake/locks"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _mtimes(workdir: Path, names) -> dict[str, int]:
    return {n: (workdir / RES / n).stat().st_mtime_ns for n in names}


@contextlib.contextmanager
def _mounted(*args: str, target: Path):
    """``mount *args target``; skips the test when this machine cannot mount (not root, no
    permission in a container). Unmounted (lazily if busy) afterwards."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed: {proc.stderr.strip()}")
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def _remove(workdir: Path, *names: str) -> None:
    for name in names:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- stages


class Stages:
    """One tiny workflow run taken stage by stage in a template folder, a snapshot after each.

    directions: prompts, baseline, directions (no study yet); trials: the study of N_TRIALS trials
    and its table; adapter: export; full: merge, evaluate (summary.json)."""

    TARGETS: ClassVar[dict[str, list[str]]] = {
        "directions": [f"{RES}/directions.safetensors", f"{RES}/baseline/logprobs.safetensors",
                       f"{RES}/baseline/metrics.json"],
        "trials": [f"{RES}/trials.csv"],
        "adapter": [f"{RES}/adapter"],
        "full": [],
    }

    def __init__(self, root: Path, model_path: Path):
        self.root = root
        self.build = root / "build"
        wr.write_config(self.build, wr.tiny_config(model_path, study={"n_trials": N_TRIALS, "n_startup_trials": 2}))
        self.done: dict[str, Path] = {}

    def copy(self, stage: str, dest: Path) -> Path:
        for name, targets in self.TARGETS.items():
            if name not in self.done:
                wr.run(self.build, *targets)
                self.done[name] = _copy(self.build, self.root / name)
            if name == stage:
                return _copy(self.done[name], dest)
        raise KeyError(stage)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("fault-model") / "model")


@pytest.fixture(scope="module")
def stages(tmp_path_factory, model_path) -> Stages:
    return Stages(tmp_path_factory.mktemp("fault-stages"), model_path)


# ------------------------------------------------------------------ a. second run on a live folder

# ~0.15 s each on 2 CPU cores: the study must outlive the second run's start-up, which took over
# 80 trials' time on a loaded CI machine (the study finished and the second run met its incomplete
# output instead of the lock)
LIVE_TRIALS = 300


@pytest.mark.parametrize("via", ["symlink", "bind_mount"])
def test_second_run_on_a_live_runs_folder_is_refused(tmp_path, stages, model_path, via):
    """The old bug: a second snakemake reaching the folder by another path deleted the first run's
    locks and ran its study concurrently (failing the first's running trial as killed)."""
    wd = stages.copy("directions", tmp_path / "wd")
    wr.write_config(wd, wr.tiny_config(model_path, study={"n_trials": LIVE_TRIALS, "n_startup_trials": 2}))
    other = tmp_path / "other"
    with contextlib.ExitStack() as stack:
        if via == "symlink":
            other.symlink_to(wd, target_is_directory=True)
        else:
            stack.enter_context(_mounted("--bind", str(wd), target=other))
        first = wr.start(wd, f"{RES}/trials.csv", output=tmp_path / "first.log")
        try:
            _wait_for_a_trial(wd, first, tmp_path / "first.log", poll=0.05)
            locks = _locks(wd)
            assert locks, "the live run holds no lock"

            second = wr.run(other, check=False)
            live = first.poll() is None
            assert not (wd / f"{RES}/study/worker-0.json").exists(), (
                "the study finished before the second run's lock check: raise LIVE_TRIALS")
            assert second.returncode != 0 and LOCK_MESSAGE in second.stderr and "--unlock" in second.stderr, (
                f"the second run was not refused (first run still running: {live}):\n{second.stderr[-3000:]}")
            assert _locks(wd) == locks and all(p.exists() for p in locks), "the live run's locks were removed"
            assert live, "the study finished before the second run's lock check: raise LIVE_TRIALS"

            if via == "symlink":  # a dry run plans, never touches the locks
                dry = wr.run(other, "-n", check=False)
                assert first.poll() is None, "the study finished before the dry run: raise LIVE_TRIALS"
                assert _locks(wd) == locks and all(p.exists() for p in locks), dry.stderr[-3000:]

            assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-6000:]
        finally:
            if first.poll() is None:
                wr.kill(first)
    _assert_study(wd, LIVE_TRIALS)
    failed = [t for t in _trials(wd) if t[1] == "FAIL"]
    assert not failed, failed
    log = (wd / "results/logs/tiny/study-0.log").read_text()
    assert "killed job" not in log and "interrupted" not in log, log[-3000:]
    assert not _locks(wd)


# ------------------------------------------------------------------- b. SIGKILL inside a rule

def _prepared_kill(stages: Stages, rule: str, dest: Path) -> tuple[Path, str]:
    """A copy ready to run ``rule`` next, and the target that runs it."""
    if rule == "directions":  # directions again, then a fresh study on them
        wd = stages.copy("directions", dest)
        _remove(wd, f"{RES}/directions.safetensors", f"{RES}/plots/directions.png")
        target = f"{RES}/trials.csv"
    elif rule == "export":
        wd, target = stages.copy("trials", dest), f"{RES}/adapter"
    else:
        wd, target = stages.copy("adapter", dest), f"{RES}/model"
    _remove(wd, f"results/logs/tiny/{rule}.log")
    return wd, target


def _running(wd: Path, rule: str) -> bool:
    if rule == "merge":  # the job's temporary model folder: a few ms on the tiny model
        return any(e.name.startswith(".model.") for e in os.scandir(wd / RES))
    return (wd / f"results/logs/tiny/{rule}.log").exists()


def _landed(wd: Path, rule: str) -> bool:
    """Whether the kill interrupted the rule's job (else it had finished first)."""
    if rule == "merge":
        return any(p.name.startswith(".model.") for p in (wd / RES).iterdir())
    output = {"directions": "directions.safetensors", "export": "selected.json"}[rule]
    return not (wd / RES / output).exists()


@pytest.mark.parametrize("rule", ["directions", "export", "merge"])
def test_sigkill_inside_a_rule_then_unlock_and_resume(tmp_path, stages, rule):
    poll = 0.001 if rule == "merge" else 0.02
    for attempt in range(5):
        wd, target = _prepared_kill(stages, rule, tmp_path / f"wd{attempt}")
        proc = wr.start(wd, target, output=tmp_path / f"killed{attempt}.log")
        try:
            deadline = time.time() + 300
            while not _running(wd, rule) and proc.poll() is None and time.time() < deadline:
                time.sleep(poll)
        finally:
            wr.kill(proc)
        if _landed(wd, rule):
            break
    else:
        pytest.skip(f"5 kills missed the {rule} job (it finished before the poll saw it)")

    if rule == "merge":
        assert not (wd / RES / "model/config.json").exists()  # nothing complete-looking
    plain = wr.run(wd, target, check=False)
    assert plain.returncode != 0
    assert LOCK_MESSAGE in plain.stderr and "--unlock" in plain.stderr, plain.stderr[-3000:]
    wr.run(wd, "--unlock")
    assert not _locks(wd)
    rerun = wr.run(wd, target, "--rerun-incomplete")
    assert f"rule {rule}:" in rerun.stderr
    _assert_study(wd, N_TRIALS)
    assert not _temporaries(wd), _temporaries(wd)  # the killed job's leftovers went with the rewrite
    if rule == "merge":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(wd / RES / "model")
        assert model.config.num_hidden_layers == 3


# ------------------------------------------------------------------------------ c. disk full

TMPFS_SIZE = "16m"  # a finished tiny run's folder is about 1 MiB (the model stays outside)
LEAVE_FREE = 96 * 1024  # room for Snakemake's own bookkeeping, not for a model or the study's writes


def _fill(mount: Path, leave: int) -> Path:
    """A file taking all but ``leave`` bytes of the file system (a running job may take some meanwhile)."""
    filler = mount / "filler"
    for _ in range(8):
        st = os.statvfs(mount)
        size = st.f_bavail * st.f_frsize - leave
        try:
            with open(filler, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, size)
            return filler
        except OSError:
            filler.unlink(missing_ok=True)
            leave += 64 * 1024
    raise AssertionError(f"could not fill {mount}")


def _quick_check(workdir: Path) -> list[str]:
    con = sqlite3.connect(f"file:{urllib.parse.quote(str(workdir / DB))}?mode=ro", uri=True, timeout=30)
    try:
        return [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
    finally:
        con.close()


FULL_DURING_TRIALS = 24  # the disk fills while this study runs (after its first trial)


@pytest.mark.parametrize("case", ["study", "study-more-trials", "merge"])
def test_disk_full_fails_cleanly_then_resumes(tmp_path, stages, model_path, case):
    """study: the disk fills up during a study; study-more-trials: a finished study asked for more
    trials on a full disk; merge: the merged model does not fit. Each job fails, leaves no
    temporaries and nothing complete-looking, the study keeps its trials; with room again the
    same command completes the run."""
    mount = tmp_path / "tmpfs"
    with _mounted("-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", target=mount):
        if case == "study":
            wd = stages.copy("directions", mount / "wd")
            wr.write_config(wd, wr.tiny_config(model_path, study={"n_trials": FULL_DURING_TRIALS,
                                                                   "n_startup_trials": 2}))
            n_trials, args, rule = FULL_DURING_TRIALS, [f"{RES}/trials.csv"], "study"
        elif case == "study-more-trials":
            wd = stages.copy("trials", mount / "wd")
            n_trials, rule = N_TRIALS + 8, "study"
            args = [f"{RES}/trials.csv", "--config", f"study={{n_trials: {N_TRIALS + 8}}}"]
        else:
            wd = stages.copy("adapter", mount / "wd")
            n_trials, args, rule = N_TRIALS, [f"{RES}/model"], "merge"
        shutil.rmtree(wd / "results/logs")

        if case == "study":
            proc = wr.start(wd, *args, output=tmp_path / "failed.log")
            try:
                _wait_for_a_trial(wd, proc, tmp_path / "failed.log", poll=0.02)
                before = _trials(wd)
                filler = _fill(mount, 0)
                returncode = proc.wait(timeout=300)
            finally:
                if proc.poll() is None:
                    wr.kill(proc)
            failed = subprocess.CompletedProcess(proc.args, returncode, "", (tmp_path / "failed.log").read_text())
        else:
            before = _trials(wd)
            filler = _fill(mount, LEAVE_FREE)
            failed = wr.run(wd, *args, check=False)
        text = _job_text(failed, wd)
        assert failed.returncode != 0, failed.stderr[-3000:]
        assert f"rule {rule}:" in failed.stderr  # the job ran and hit the full disk itself
        assert DISK_FULL.search(text), text[-4000:]
        assert not _temporaries(wd), _temporaries(wd)
        assert not (wd / RES / "model/config.json").exists()
        assert _quick_check(wd) == ["ok"]
        kept = {t for t in before if t[1] == "COMPLETE"}
        assert set(_trials(wd)) >= kept  # the database opens, its trials kept
        if rule == "study":
            assert len(_complete(wd)) < n_trials

        filler.unlink()
        wr.run(wd, *args)
        _assert_study(wd, n_trials)
        assert not _temporaries(wd), _temporaries(wd)
        if case == "merge":
            assert (wd / RES / "model/config.json").exists()


# --------------------------------------------------------------------------- d. damaged files

def _zero_a_data_page(db: Path) -> None:
    """Zero one 4 KiB page from the middle on until SQLite's integrity check sees the damage (a
    free page could be zeroed harmlessly)."""
    original = db.read_bytes()
    assert not Path(f"{db}-wal").exists()  # checkpointed: the file holds everything
    for offset in range(len(original) // 2 // 4096 * 4096, len(original), 4096):
        damaged = bytearray(original)
        damaged[offset:offset + 4096] = bytes(4096)
        db.write_bytes(bytes(damaged))
        con = sqlite3.connect(f"file:{urllib.parse.quote(str(db))}?mode=ro", uri=True)
        try:
            result = [r[0] for r in con.execute("PRAGMA integrity_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            result = [str(exc)]
        finally:
            con.close()
        if result != ["ok"]:
            return
    raise AssertionError("no page of the study database was found whose damage SQLite detects")


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize(
    "damaged, damage, args, message",
    [
        ("study.sqlite", _zero_a_data_page, ["--config", f"study={{n_trials: {N_TRIALS + 2}}}"], r"study\.sqlite"),
        ("study.sqlite", _zero_a_data_page, ["--forcerun", "trials"], r"study\.sqlite"),
        ("directions.safetensors", _truncate_half, [], r"directions\.safetensors"),
    ],
    ids=["study-sqlite-more-trials", "study-sqlite-trials-table", "directions-truncated"],
)
def test_damaged_file_fails_naming_it(tmp_path, stages, damaged, damage, args, message):
    wd = stages.copy("full", tmp_path / "wd")
    shutil.rmtree(wd / "results/logs")
    kept = ["selected.json", "pareto.csv", "adapter/adapter_config.json", "model/config.json", "summary.json",
            "plots/pareto.png"]
    before = _mtimes(wd, kept)
    damage(wd / RES / damaged)
    proc = wr.run(wd, *args, check=False)
    text = _job_text(proc, wd)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert re.search(message, text), text[-4000:]
    assert _mtimes(wd, kept) == before  # export, merge and summary not rewritten
    assert not _temporaries(wd), _temporaries(wd)
