"""The study's ledger: a database that lost trials (emptied, deleted, truncated, replaced by an
older copy, damaged) is refused before anything is written to it, and says what to do."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading

import pytest
from abliterate import study as st
from abliterate.errors import DamagedFileError, StudyLostError
from abliterate.study_ledger import Ledger, storage_key
from study_space import SPACE
from test_study import FAST, N_LAYERS, cheap_objective

NAME = "abliterate-tiny-0123456789ab"


def _run(url, ledger, n_trials):
    summary = st.run_worker(url, NAME, cheap_objective, n_trials, seed=0, sampler_kwargs=FAST, n_layers=N_LAYERS,
                            progress=False, ledger=ledger, space=SPACE)
    db = st.sqlite_path(url)
    with sqlite3.connect(db) as connection:  # what the job's exit does: the WAL folded into the file
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return summary


@pytest.fixture
def finished(tmp_path):
    db = tmp_path / "study.sqlite"
    url = f"sqlite:///{db}"
    ledger = tmp_path / "study-ledger.json"
    _run(url, ledger, 4)
    return db, url, ledger


def test_the_ledger_records_the_completed_trials(finished):
    _db, url, ledger = finished
    assert Ledger.at(ledger).recorded(url) == {NAME: 4}
    data = json.loads(ledger.read_text())
    assert list(data["storages"]) == [storage_key(url)]
    assert st.trials_frame(url, NAME, ledger)["state"].eq("COMPLETE").sum() == 4
    assert _run(url, ledger, 6)["study_n_complete"] == 6  # more trials continue the study
    assert Ledger.at(ledger).recorded(url) == {NAME: 6}


@pytest.mark.parametrize("fault", ["emptied", "deleted"])
def test_an_emptied_or_deleted_database_is_refused_and_left_as_it_is(finished, fault):
    db, url, ledger = finished
    for suffix in ("", "-wal", "-shm"):  # what `: > study.sqlite` or `rm` leaves after a clean exit
        path = db.with_name(db.name + suffix)
        if path.exists():
            path.unlink()
    if fault == "emptied":
        db.write_bytes(b"")
    message = rf"{db}: study '{NAME}' had 4 completed trials \(recorded in {ledger}\).*file is " + \
        ("empty" if fault == "emptied" else "missing") + r".*Restore the database.*delete both"
    with pytest.raises(StudyLostError, match=message):
        _run(url, ledger, 10)
    with pytest.raises(StudyLostError, match=message):
        st.trials_frame(url, NAME, ledger)
    with pytest.raises(StudyLostError):
        st.study_stats(url, NAME, ledger)
    assert (db.stat().st_size == 0) if fault == "emptied" else not db.exists()  # nothing written


def test_a_truncated_database_is_refused(finished):
    db, url, ledger = finished
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    with pytest.raises((DamagedFileError, StudyLostError), match=rf"{db}.*(delete both|start the study over)"):
        _run(url, ledger, 10)
    assert db.stat().st_size == len(data) // 2


def test_damaged_pages_are_refused(finished):
    db, url, ledger = finished
    data = bytearray(db.read_bytes())
    page = 4096
    data[page: 3 * page] = bytes(2 * page)  # two pages after the header: the schema's tables
    db.write_bytes(bytes(data))
    with pytest.raises((DamagedFileError, StudyLostError), match=str(db)):
        _run(url, ledger, 10)


def test_an_older_copy_holding_fewer_trials_is_refused(tmp_path):
    db = tmp_path / "study.sqlite"
    url = f"sqlite:///{db}"
    ledger = tmp_path / "study-ledger.json"
    _run(url, ledger, 2)
    backup = tmp_path / "backup.sqlite"
    shutil.copy(db, backup)
    _run(url, ledger, 5)
    shutil.copy(backup, db)
    db.with_name(db.name + "-wal").unlink(missing_ok=True)  # a restore brings the file alone
    with pytest.raises(StudyLostError, match=r"had 5 completed trials.*holds 2 completed"):
        _run(url, ledger, 6)


def test_deleting_both_starts_over_and_a_study_without_a_ledger_gets_one(finished):
    db, url, ledger = finished
    ledger.unlink()
    assert _run(url, ledger, 4)["n_complete"] == 0  # an existing study, recorded as found
    assert Ledger.at(ledger).recorded(url) == {NAME: 4}
    db.unlink()
    ledger.unlink()
    assert _run(url, ledger, 2)["study_n_complete"] == 2


def test_a_damaged_ledger_is_refused_naming_it(finished):
    _db, url, ledger = finished
    ledger.write_text("{not json")
    with pytest.raises(DamagedFileError, match=rf"{ledger} \(the study ledger\).*delete it"):
        _run(url, ledger, 5)


def test_concurrent_records_never_lower_the_count(tmp_path):
    ledger = Ledger.at(tmp_path / "study-ledger.json")
    url = "postgresql://user:secret@db.example/optuna"
    threads = [threading.Thread(target=ledger.record, args=(url, NAME, n)) for n in (3, 9, 1, 7, 9, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.recorded(url) == {NAME: 9}
    assert "secret" not in ledger.path.read_text()  # the password never reaches the file
    with pytest.raises(StudyLostError, match=r"does not hold it"):
        ledger.check(url, NAME, None)
    with pytest.raises(StudyLostError, match=r"holds 8 completed"):
        ledger.check(url, NAME, 8)
    ledger.check(url, NAME, 9)
    ledger.check(url, "another-study", None)
