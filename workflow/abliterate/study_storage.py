"""A study database on a server (PostgreSQL, MySQL): reached once before any job, and a clear
error naming ``study.storage`` when it stops answering during a study.

SQLite files are left alone here: a job creates the file, and its errors (a full disk, a damaged
file) are reported where they happen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import AbliterateError, ConfigError

# The connectivity check runs whenever the workflow is parsed (every snakemake call, every
# cluster job): an unreachable host must not hold it up for libpq's default of forever.
CONNECT_TIMEOUT_S = 5


class StudyStorageError(AbliterateError):
    """The study's database server stopped answering while a study job used it."""


def _is_server(url: str) -> bool:
    from sqlalchemy.engine import make_url

    return make_url(url).get_backend_name() != "sqlite"


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _reason(exc: BaseException) -> str:
    """The driver's own words (``orig`` of a SQLAlchemy error), on one line."""
    cause = getattr(exc, "orig", None) or exc
    return f"{type(cause).__name__}: {' '.join(str(cause).split())}"


def check_reachable(url: str) -> None:
    """Connect once to a server database (``CONNECT_TIMEOUT_S``); ``ConfigError`` naming
    ``study.storage`` when the server is down, unreachable, or refuses the user, password or
    database. SQLite URLs are not opened."""
    if not _is_server(url):
        return
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    backend = make_url(url).get_backend_name()
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if backend in ("postgresql", "mysql") else {}
    engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"study.storage: cannot connect to {_shown(url)} ({_reason(exc)}); check that the database "
            "server runs and is reachable from this host, and the user, password and database in the URL"
        ) from exc
    finally:
        engine.dispose()


def _lost_connection(exc: BaseException) -> BaseException | None:
    """The SQLAlchemy connection error behind ``exc`` (Optuna wraps it in StorageInternalError)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (OperationalError, InterfaceError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def connection_errors(url: str) -> Iterator[None]:
    """Re-raise a lost connection to a server database as ``StudyStorageError`` naming
    ``study.storage`` and what to do; other errors, and SQLite's, pass unchanged."""
    try:
        yield
    except Exception as exc:
        cause = _lost_connection(exc) if _is_server(url) else None
        if cause is None:
            raise
        raise StudyStorageError(
            f"study.storage: the study database {_shown(url)} stopped answering ({_reason(cause)}). "
            "The trials it recorded as complete are kept, and the trial that was running is asked again: "
            "once the server is back, rerun the same command."
        ) from exc
