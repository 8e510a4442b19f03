"""abliterate.study_storage without a server: what is wrapped, what passes unchanged, what is never opened."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy.exc
from abliterate import study_storage
from abliterate.errors import ConfigError

SERVER = "postgresql+psycopg://user:hunter2@127.0.0.1:1/optuna"


def _lost() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("UPDATE trials", {}, Exception("server closed the connection unexpectedly"))


def test_a_lost_server_is_named_as_study_storage_without_its_password():
    with pytest.raises(study_storage.StudyStorageError) as caught, study_storage.connection_errors(SERVER):
        try:  # as Optuna's RDBStorage wraps it
            raise _lost()
        except sqlalchemy.exc.OperationalError as exc:
            raise optuna.exceptions.StorageInternalError("invalid data") from exc
    message = str(caught.value)
    assert message.startswith("study.storage: the study database postgresql+psycopg://user:***@127.0.0.1:1/optuna")
    assert "server closed the connection unexpectedly" in message and "rerun" in message
    assert "hunter2" not in message


@pytest.mark.parametrize("url, error", [
    ("sqlite:///results/run/study.sqlite", _lost()),  # SQLite's own errors are reported where they happen
    (SERVER, ValueError("not a connection error")),
])
def test_other_errors_pass_unchanged(url, error):
    with pytest.raises(type(error)), study_storage.connection_errors(url):
        raise error


def test_sqlite_is_not_opened(tmp_path):
    study_storage.check_reachable(f"sqlite:///{tmp_path}/missing/study.sqlite")
    assert not (tmp_path / "missing").exists()


def test_an_unreachable_server_is_a_config_error_naming_study_storage():
    pytest.importorskip("psycopg")
    with pytest.raises(ConfigError, match=r"^study\.storage: cannot connect to postgresql\+psycopg://user:\*\*\*@") as caught:
        study_storage.check_reachable(SERVER)  # port 1: nothing listens
    assert "hunter2" not in str(caught.value)
