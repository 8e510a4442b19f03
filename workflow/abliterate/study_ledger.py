"""What a study had, recorded outside its database, so a lost database is refused instead of
silently starting a new study.

A SQLite file emptied by a mistaken ``: > study.sqlite``, deleted, or replaced by an older copy
opens as a valid database: Optuna would create the study again and the rerun would run every trial
anew, rewriting export and merge as if nothing had happened. The ledger, a small JSON file in the
run's folder, holds for each storage and study name the most completed trials the workers ever saw;
a database holding fewer is refused with what to do. It is rewritten atomically after every
completed trial, under a file lock, never lowering a count (two workers may report out of order).

Torch- and optuna-free: SQLite files are checked through ``sqlite3`` read-only, before Optuna opens
them (it would write its schema into an emptied or damaged file).
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from . import io
from .errors import DamagedFileError, StudyLostError

LEDGER_NAME = "study-ledger.json"
SCHEMA = 1


def storage_key(url: str) -> str:
    """The storage as the ledger names it: the URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class Ledger:
    path: Path

    @classmethod
    def at(cls, path: str | Path) -> Ledger:
        return cls(Path(path))

    # ------------------------------------------------------------------ reading

    def recorded(self, storage_url: str) -> dict[str, int]:
        """Completed-trial counts by study name recorded for this storage ({} before the first)."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            studies = data["storages"].get(storage_key(storage_url), {})
            return {name: int(entry["n_complete"]) for name, entry in studies.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DamagedFileError(
                f"{self.path} (the study ledger) cannot be read ({type(exc).__name__}: {exc}); delete it: "
                "the next study job records the database's trials again") from exc

    def _lost(self, storage_url: str, name: str, recorded: int, found: int | None, why: str) -> StudyLostError:
        where = sqlite_file(storage_url) or storage_key(storage_url)
        had = "does not hold it" if found is None else f"holds {found} completed"
        return StudyLostError(
            f"{where}: study {name!r} had {recorded} completed trials (recorded in {self.path}), but the "
            f"database {why or had}. Restore the database from a backup, or, to start the study over, "
            f"delete both {where} and {self.path}.")

    def check_sqlite(self, storage_url: str) -> None:
        """Before the SQLite file is opened for writing: refuse it when it is missing, empty, damaged,
        or holds fewer completed trials of a recorded study than the ledger says."""
        path = sqlite_file(storage_url)
        recorded = {name: n for name, n in self.recorded(storage_url).items() if n > 0}
        if path is None or not recorded:
            if path is not None and path.exists() and path.stat().st_size:
                sqlite_complete_counts(path)  # still refuse a damaged file
            return
        if not path.exists():
            name, n = next(iter(recorded.items()))
            raise self._lost(storage_url, name, n, None, "file is missing")
        if path.stat().st_size == 0:
            name, n = next(iter(recorded.items()))
            raise self._lost(storage_url, name, n, None, "file is empty")
        counts = sqlite_complete_counts(path)
        for name, n in recorded.items():
            if counts.get(name, 0) < n:
                raise self._lost(storage_url, name, n, counts.get(name), "")

    def check(self, storage_url: str, name: str, n_complete: int | None) -> None:
        """Refuse a study (``n_complete`` None: absent from the database) below its recorded count."""
        recorded = self.recorded(storage_url).get(name, 0)
        if recorded and (n_complete is None or n_complete < recorded):
            raise self._lost(storage_url, name, recorded, n_complete, "")

    # ------------------------------------------------------------------ writing

    def record(self, storage_url: str, name: str, n_complete: int) -> None:
        """Raise the recorded count of ``name`` to ``n_complete`` (never lower it)."""
        with io.file_lock(self.path):
            data = {"schema": SCHEMA, "storages": {}}
            if self.path.exists():
                self.recorded(storage_url)  # a damaged ledger is refused, not overwritten
                data = json.loads(self.path.read_text())
            studies = data["storages"].setdefault(storage_key(storage_url), {})
            entry = studies.get(name, {"n_complete": 0})
            if n_complete <= int(entry["n_complete"]) and name in studies:
                return
            studies[name] = {"n_complete": int(n_complete),
                             "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            io.write_json(data, self.path)


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for in-memory SQLite and server URLs."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def sqlite_complete_counts(path: Path) -> dict[str, int]:
    """Completed trials per study in an Optuna SQLite file, read-only; a damaged file raises
    ``DamagedFileError`` naming it."""
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
    advice = (f"restore {path} from a backup, or delete it and the {LEDGER_NAME} beside the run's "
              "results to start the study over")
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=60)
        try:
            problems = [row[0] for row in connection.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise DamagedFileError(f"{path} is damaged (SQLite: {'; '.join(problems[:3])}); {advice}")
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"studies", "trials"} <= tables:
                return {}
            rows = connection.execute(
                "SELECT s.study_name, COUNT(t.trial_id) FROM studies s LEFT JOIN trials t "
                "ON t.study_id = s.study_id AND t.state = 'COMPLETE' GROUP BY s.study_name").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        raise DamagedFileError(f"{path} cannot be read as a study database (SQLite: {exc}); {advice}") from exc
    return {name: int(n) for name, n in rows}
