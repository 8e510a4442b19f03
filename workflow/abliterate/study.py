"""The Optuna study that tunes ablation strength: storage, search space and a resumable worker loop.

Two objectives are minimised together: the number of refusals on harmful prompts and the KL
divergence from the original model on harmless prompts. The objective itself (apply an ablation,
count refusals, measure KL, undo the ablation) is a callable given by the caller, so this module
has no model code and tests on the CPU in seconds.

Design choices (Optuna 5):

* ``TPESampler(multivariate=True)``: multi-objective TPE defaults to independent sampling, but the
  kernel parameters interact strongly (a high peak weight needs a narrow kernel), so they are
  sampled jointly. The search space is kept *fixed* for that reason: ``direction_index`` is
  suggested even when ``direction_scope`` is ``per_layer`` (and then ignored), as Heretic does,
  because multivariate TPE only models parameters present in every trial. A space restricted to
  one scope (``scopes``) suggests no ``direction_scope`` and, for ``per_layer``, no index.
  ``constant_liar`` keeps parallel workers from sampling next to each other's running trials.
* A fresh sampler is seeded per trial from ``(seed, worker_id, number of trials so far)``. A single
  seeded sampler would replay its random start-up sequence after a restart and so repeat finished
  trials; this way a restarted or second worker draws new points and one worker stays reproducible.
* ``stop_dominated``: the objective may stop evaluating a trial once an earlier one with lower KL
  refuses no more (:func:`refusal_cap`); such a trial keeps a lower bound for its refusals and a
  ``dominated_by`` attribute, and is never on the front, so TPE's "good" group does not change.
* ``refusal_constraint``: a trial refusing more than this share of its prompts is told to TPE as
  infeasible (``Trial.set_constraint``), so that its "good" group is the best of the trials within
  the export's refusal target, where the export chooses, instead of the whole front's best, most of
  which refuses more than any user would keep.
* Ask/tell instead of ``study.optimize``: the worker controls the trial budget across processes
  (exactly ``n_trials`` COMPLETE trials) and re-queues trials of killed jobs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from abliterate import io, study_ledger
from abliterate.errors import ConfigError
from abliterate.kl_value import checked as kl_checked

logger = logging.getLogger(__name__)

DIRECTIONS = ("minimize", "minimize")
OBJECTIVES = ("refusals", "kl")

# What the design above needs from TPE, given explicitly rather than left to Optuna's defaults (the
# constant_liar default changed in Optuna 5.0). The counts (n_startup_trials, n_ei_candidates) are
# the config's: their defaults live in the config schema alone.
DEFAULT_SAMPLER_KWARGS: dict[str, Any] = {"multivariate": True, "constant_liar": True}

# A refusal direction taken at one (interpolated) layer for all, or each layer's own.
SCOPES = ("global", "per_layer")

# A space (the form suggest_params takes; the workflow builds it from config study.space, whose
# schema holds the defaults and the reasons for them):
#   {"direction_index": {"low", "high", "relative", "scopes"},
#    "components": {kind: {"max_weight", "max_weight_position", "min_weight", "min_weight_distance"}},
#    "n_directions": {"low", "high"} (optional, default 1), "secondary_weight": {"low", "high"} (optional)}
# A sampled max_weight below 0 switches that kind off for the trial (Heretic #387).
# Relative values are multiplied by the last layer index (n_layers - 1): a relative direction_index
# of 1.0 is the last decoder layer's output (abliterate.ablation.direction_for).

_KERNEL_KEYS = ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")
_RESERVED_ATTRS = ("ablation_params", "worker", "seconds", "error", "retry_of", "surplus")
# Set by an objective that stopped evaluating once the trial was dominated (see refusal_cap):
# its refusals value is then a lower bound.
DOMINATED_BY = "dominated_by"


# --------------------------------------------------------------------------- storage


def study_name(prefix: str, config_fragment: Any) -> str:
    """``<prefix>-<hash>``; the caller leaves n_trials and worker counts out of the fragment so a
    larger ``n_trials`` continues the same study."""
    return f"{prefix}-{io.config_hash(config_fragment)}"


sqlite_path = study_ledger.sqlite_file


@contextlib.contextmanager
def study_lock(url: str) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``<db>.lock`` for SQLite files; a no-op otherwise.

    It serialises "count trials, then ask" between worker processes on one machine. fcntl locks
    are unreliable on some network file systems, which is one more reason to use a database
    server (PostgreSQL, MySQL) when workers run on several nodes.
    """
    path = sqlite_path(url)
    with io.file_lock(path) if path is not None else contextlib.nullcontext():
        yield


def make_storage(
    url: str, heartbeat_interval: int | None = 60, grace_period: int | None = None
) -> optuna.storages.RDBStorage:
    """An ``RDBStorage`` that several worker processes can share.

    For a SQLite file: write-ahead logging (readers never block the writer, and the mode persists
    in the file) and a 60 s busy timeout, so concurrent writers wait instead of failing with
    "database is locked". WAL needs shared memory, i.e. all workers on one machine. Other URLs
    are passed through unchanged.

    With ``heartbeat_interval`` set, a trial whose worker stopped sending heartbeats for
    ``grace_period`` seconds (default twice the interval) is failed by the next worker that asks
    for a trial, and its parameters are queued again.
    """
    path = sqlite_path(url)
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    kwargs: dict[str, Any] = {}
    if heartbeat_interval is not None:
        kwargs = {
            "heartbeat_interval": int(heartbeat_interval),
            "grace_period": None if grace_period is None else int(grace_period),
            "heartbeat_stale_trial_callback": _requeue_stale_trial,
        }
    with study_lock(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Before Optuna opens the file; under the lock because two workers may create it.
            connection = sqlite3.connect(path, timeout=60)
            try:
                mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            finally:
                connection.close()
            if mode.lower() != "wal":
                logger.warning("%s: SQLite journal mode is %s, not WAL", path, mode)
        storage = _open_rdb_storage(url, engine_kwargs, kwargs)
    if path is not None:
        import sqlalchemy

        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_on_connect)
        storage.engine.dispose()  # pooled connections opened before the listener lack the pragma
    return storage


def _open_rdb_storage(
    url: str, engine_kwargs: dict[str, Any], kwargs: dict[str, Any], attempts: int = 5
) -> optuna.storages.RDBStorage:
    """``RDBStorage(url)``, tried again when another process is creating the same schema.

    Optuna creates its tables with check-then-create, which is not atomic across processes. Our
    workers serialise it under ``study_lock``, but a reader that does not take the lock (the
    dashboard, a notebook, a test polling the study) can create tables between our check and our
    create, and the worker then died with "table study_directions already exists". The second
    attempt finds the tables and goes on.
    """
    import sqlalchemy.exc

    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as exc:
            if attempt == attempts or "already exists" not in str(exc) and "UNIQUE" not in str(exc):
                raise
            logger.warning("%s: another process was creating the study schema (%s); trying again",
                           url, str(exc).splitlines()[0])
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Optuna commits once per suggested value. With WAL, synchronous=NORMAL skips the fsync of
    # each commit yet keeps the file consistent after a crash; a power cut can
    # lose the last commits, which only means a trial is run again.
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def load_or_create_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """Open study ``name``, creating it with the two minimised objectives if it does not exist."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(storage=storage, study_name=name, directions=list(DIRECTIONS),
                                    load_if_exists=True)
        if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
            raise ConfigError(
                f"study {name!r} exists with directions {study.directions}, not {DIRECTIONS}; "
                "use another study name or storage"
            )
        if study.metric_names is None:
            study.set_metric_names(list(OBJECTIVES))
    return study


def _open_ledger(ledger: str | os.PathLike | None, storage_url: str) -> study_ledger.Ledger | None:
    """The study's ledger, its SQLite file checked against it before Optuna opens (and writes) it."""
    if ledger is None:
        return None
    book = study_ledger.Ledger.at(ledger)
    with study_lock(storage_url):
        book.check_sqlite(storage_url)
    return book


def _n_complete(storage: optuna.storages.BaseStorage, name: str) -> int | None:
    """Completed trials of study ``name``; None when the storage does not hold it."""
    if name not in optuna.get_all_study_names(storage):
        return None
    study = optuna.load_study(study_name=name, storage=storage)
    return len(_count(study, (TrialState.COMPLETE,)))


def _load_study(storage_url: str, name: str, ledger: str | os.PathLike | None = None) -> optuna.Study:
    """An existing study; with ``ledger``, refused when it holds fewer completed trials than recorded."""
    path = sqlite_path(storage_url)
    book = _open_ledger(ledger, storage_url)
    if path is not None and not path.exists():
        raise FileNotFoundError(f"{path}: no study database; run the study first")
    storage = make_storage(storage_url, heartbeat_interval=None)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as exc:
        if book is not None:
            book.check(storage_url, name, None)
        names = optuna.get_all_study_names(storage)
        raise ConfigError(f"no study {name!r} in {storage_url}; it holds {names}") from exc
    if book is not None:
        book.check(storage_url, name, len(_count(study, (TrialState.COMPLETE,))))
    return study


# --------------------------------------------------------------------------- search space


def _range(spec: Any, where: str) -> tuple[float, float]:
    if isinstance(spec, Mapping):
        spec = [spec.get("low"), spec.get("high")]
    if not isinstance(spec, (list, tuple)) or len(spec) != 2:
        raise ConfigError(f"{where}: expected [low, high], got {spec!r}")
    try:
        low, high = float(spec[0]), float(spec[1])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bounds must be numbers, got {spec!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ConfigError(f"{where}: need finite low <= high, got {spec!r}")
    return low, high


def direction_scopes(direction: Mapping[str, Any]) -> list[str]:
    """The direction scopes a space allows (``scopes``, default both)."""
    return list(direction.get("scopes", SCOPES))


def validate_space(space: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` naming the key of the first impossible range in ``space``."""
    direction = space.get("direction_index")
    if not isinstance(direction, Mapping):
        raise ConfigError("search space: 'direction_index' must be a mapping with low and high")
    low, high = _range(direction, "search space direction_index")
    if direction.get("relative", True) and not (0.0 <= low and high <= 1.0):
        raise ConfigError("search space direction_index: relative bounds must lie in [0, 1]")
    scopes = direction_scopes(direction)
    if not scopes or len(set(scopes)) != len(scopes) or not set(scopes) <= set(SCOPES):
        raise ConfigError(f"search space direction_index.scopes: {list(scopes)!r}; give one or both of "
                          f"{list(SCOPES)}")
    _directions_range(space)
    components = space.get("components")
    if not isinstance(components, Mapping) or not components:
        raise ConfigError("search space: 'components' must map component kinds to kernel ranges")
    for kind, kernel in components.items():
        if not isinstance(kernel, Mapping):
            raise ConfigError(f"search space components.{kind}: expected a mapping")
        unknown = set(kernel) - set(_KERNEL_KEYS)
        if unknown:
            raise ConfigError(f"search space components.{kind}: unknown keys {sorted(unknown)}")
        for key in _KERNEL_KEYS:
            if key not in kernel:
                raise ConfigError(f"search space components.{kind}: missing '{key}'")
        _range(kernel["max_weight"], f"components.{kind}.max_weight")
        for key in ("max_weight_position", "min_weight"):
            lo, hi = _range(kernel[key], f"components.{kind}.{key}")
            if lo < 0.0 or hi > 1.0:
                raise ConfigError(f"search space components.{kind}.{key}: must lie in [0, 1]")
        lo, hi = _range(kernel["min_weight_distance"], f"components.{kind}.min_weight_distance")
        if lo <= 0.0:
            raise ConfigError(f"search space components.{kind}.min_weight_distance: low must be > 0")


def _directions_range(space: Mapping[str, Any]) -> tuple[int, int, tuple[float, float]]:
    """``n_directions`` bounds (integers >= 1, default 1) and the ``secondary_weight`` range (in [0, 1])."""
    spec = space.get("n_directions", [1, 1])
    low, high = _range(spec, "study.space.n_directions")
    bounds = [spec.get("low"), spec.get("high")] if isinstance(spec, Mapping) else list(spec)
    if any(isinstance(b, bool) or not float(b).is_integer() for b in bounds) or low < 1:
        raise ConfigError(f"study.space.n_directions: bounds must be integers >= 1, got {list(bounds)!r}")
    secondary = _range(space.get("secondary_weight", [0.0, 1.0]), "study.space.secondary_weight")
    if secondary[0] < 0.0 or secondary[1] > 1.0:
        raise ConfigError(f"study.space.secondary_weight: must lie in [0, 1], got {list(secondary)!r}")
    return int(low), int(high), secondary


def suggest_params(trial: optuna.Trial, space: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    """Sample one ablation and return it as a flat dict in absolute units.

    Keys: ``direction_index`` (a decoder layer index, ``None`` for per-layer directions) and, per component
    kind, ``<kind>.max_weight``, ``<kind>.max_weight_position`` (layer units),
    ``<kind>.min_weight`` (absolute weight) and ``<kind>.min_weight_distance`` (layers, > 0);
    ``n_directions`` (always) and ``secondary_weight`` (when the space allows more than one direction);
    ``off``: the kinds whose sampled max_weight is below 0, comma-separated, which then have no
    kernel keys (absent when none is off). Optuna records the sampled (relative) values under the
    same names, plus ``direction_scope``. A fixed ``n_directions`` (low == high) is not suggested, so a
    space of one direction samples exactly what it sampled before the key existed.
    """
    validate_space(space)
    if int(n_layers) < 1:
        raise ConfigError(f"n_layers must be >= 1, got {n_layers}")
    last = float(n_layers - 1)
    # A one-layer model would make every distance zero; one layer is the smallest useful width.
    width = max(last, 1.0)

    direction = space["direction_index"]
    scopes = direction_scopes(direction)
    scope = scopes[0] if len(scopes) == 1 else trial.suggest_categorical("direction_scope", scopes)
    index = None
    if "global" in scopes:
        low, high = _range(direction, "direction_index")
        index = trial.suggest_float("direction_index", low, high)
        if direction.get("relative", True):
            index *= last
    flat: dict[str, Any] = {"direction_index": index if scope == "global" else None}
    k_low, k_high, secondary = _directions_range(space)
    flat["n_directions"] = trial.suggest_int("n_directions", k_low, k_high) if k_high > k_low else k_low
    if k_high > 1:  # suggested even for k = 1, so multivariate TPE sees a fixed space
        flat["secondary_weight"] = trial.suggest_float("secondary_weight", *secondary)

    off = []
    # Sorted, so that reordering the config (which keeps the study name) keeps the sampling order.
    for kind in sorted(space["components"]):
        kernel = space["components"][kind]
        values = {k: trial.suggest_float(f"{kind}.{k}", *_range(kernel[k], k)) for k in _KERNEL_KEYS}
        if values["max_weight"] < 0.0:  # switched off: left out of the trial's kernels
            off.append(kind)
            continue
        flat[f"{kind}.max_weight"] = values["max_weight"]
        flat[f"{kind}.max_weight_position"] = values["max_weight_position"] * last
        # Sampled as a fraction because TPE cannot model a range that depends on another value.
        flat[f"{kind}.min_weight"] = values["min_weight"] * values["max_weight"]
        flat[f"{kind}.min_weight_distance"] = values["min_weight_distance"] * width
    if off:
        flat["off"] = ",".join(off)
    return flat


def describe_params(flat: Mapping[str, Any]) -> str:
    """One-line summary of a flat parameter dict for logs."""
    index = flat.get("direction_index")
    parts = ["dir=per_layer" if index is None else f"dir={index:.2f}"]
    k = int(flat.get("n_directions", 1))
    if k > 1:
        parts.append(f"k={k} w2={float(flat.get('secondary_weight', 0.0)):.2f}")
    off = flat.get("off")
    parts += [f"{kind}=off" for kind in (off.split(",") if isinstance(off, str) else []) if kind]
    for kind in sorted({key.split(".", 1)[0] for key in flat if "." in key}):
        parts.append(
            f"{kind}[w={flat[f'{kind}.max_weight']:.2f}@{flat[f'{kind}.max_weight_position']:.1f}"
            f" min={flat[f'{kind}.min_weight']:.2f} d={flat[f'{kind}.min_weight_distance']:.1f}]"
        )
    return " ".join(parts)


# --------------------------------------------------------------------------- worker


def _sampler(seed: int, worker: str, n_trials_so_far: int, kwargs: Mapping[str, Any]):
    blob = f"{seed}:{worker}:{n_trials_so_far}".encode()
    derived = int.from_bytes(hashlib.sha256(blob).digest()[:4], "little")
    return optuna.samplers.TPESampler(seed=derived, **kwargs)


def _requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    # A trial popped from the queue and killed before its suggestions holds them only in fixed_params.
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    if not params:
        return  # killed before sampling: nothing to retry, a new trial is as good
    origin = trial.user_attrs.get("retry_of", trial.number)
    study.enqueue_trial(params, user_attrs={"retry_of": origin})
    logger.info("trial %d re-queued (first tried as trial %d)", trial.number, origin)


def _requeue_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat callback: Optuna has failed ``trial`` because its worker went silent."""
    worker = trial.user_attrs.get("worker", "?")
    logger.warning("trial %d of worker %s lost its heartbeat; failed", trial.number, worker)
    _requeue(study, trial)


def _fail_and_requeue(study: optuna.Study, trial: FrozenTrial, why: str) -> bool:
    try:
        changed = study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another worker (heartbeat check) finished it and re-queued it
    if changed:
        logger.warning("trial %d: %s; marked FAIL", trial.number, why)
        _requeue(study, trial)
    return changed


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.BaseStorage, trial_id: int) -> Iterator[None]:
    """Record heartbeats while the objective runs (``study.optimize`` does this; ask/tell not)."""
    interval = getattr(storage, "heartbeat_interval", None)
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        try:
            while True:
                storage.record_heartbeat(trial_id)
                if stop.wait(interval):
                    return
        finally:
            storage.remove_session()  # SQLite connections belong to the thread that opened them

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _finish(study: optuna.Study, trial: optuna.Trial, attrs: Mapping[str, Any],
            values: list[float] | None, constraint: float | None = None) -> bool:
    """Store ``attrs`` (and ``constraint``, see :func:`_past_share`) and tell ``values`` (FAIL if
    ``None``). Returns False, instead of crashing, if another worker failed and re-queued the trial
    meanwhile: that happens when its heartbeats stopped for longer than the grace period."""
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if constraint is not None:
            trial.set_constraint(CONSTRAINT, constraint)
        if values is None:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, values)
        return True
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
        state = study._storage.get_trial(trial._trial_id).state
        if state == TrialState.RUNNING:
            raise
        logger.warning("trial %d was marked %s by another worker while running (no heartbeat for longer "
                       "than grace_period?); its result is dropped and its re-queued copy will run",
                       trial.number, state.name)
        return False


def _plain(value: Any) -> Any:
    """A JSON value Optuna can store (tensor and numpy scalars become Python numbers)."""

    def default(obj: Any) -> Any:
        try:
            return io.jsonable(obj)
        except TypeError:
            return str(obj)  # an attribute is kept as text rather than failing the trial

    return json.loads(json.dumps(value, default=default))


def _check_result(result: Any) -> tuple[int, float, dict[str, Any]]:
    if not isinstance(result, Mapping) or "refusals" not in result or "kl" not in result:
        raise TypeError(f"the objective must return a mapping with refusals and kl, got {result!r}")
    attrs = _plain(dict(result))
    refusals, kl = attrs["refusals"], attrs["kl"]
    if isinstance(refusals, bool) or not float(refusals).is_integer() or refusals < 0:
        raise TypeError(f"refusals must be a count (int >= 0), got {refusals!r}")
    # the tolerance kl.kl_divergence allows: an edit that leaves the KL prompts' first tokens as
    # they were measures an exact zero as a rounding error either side of it
    return int(refusals), kl_checked(float(kl)), attrs


def refusal_cap(study: optuna.Study) -> Callable[[float, int], tuple[int, int] | None]:
    """``cap(kl, n)``: ``(refusals, number)`` of the fully evaluated COMPLETE trial on ``n`` prompts
    with the fewest refusals among those with a KL below ``kl`` (ties: lower KL), or None.

    A trial with KL ``kl`` whose refusals reach that count is dominated by that trial, whatever
    its final count: its evaluation can stop there. The front, and with it the sampler's "good"
    trials (a few of the front's), come out as without stopping, as long as the front holds more
    trials than TPE's good group (at most 10 % of trials): stopped trials only ever join its
    "bad" group, where their exact refusals do not matter.
    """

    def cap(kl: float, n: int) -> tuple[int, int] | None:
        best = None
        for trial in _count(study, (TrialState.COMPLETE,)):
            attrs = trial.user_attrs
            if DOMINATED_BY in attrs or attrs.get("n") != n or trial.values is None:
                continue
            refusals, trial_kl = trial.values
            if trial_kl < kl and (best is None or (refusals, trial_kl) < best[:2]):
                best = (refusals, trial_kl, trial.number)
        return None if best is None else (int(best[0]), best[2])

    return cap


def _count(study: optuna.Study, states: tuple[TrialState, ...]) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states)


def _is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """True if trials numbered below ``number`` already fill the budget (a race between workers
    that share a server database: both counted n_trials - 1 and both asked)."""
    busy = _count(study, (TrialState.COMPLETE, TrialState.RUNNING))
    return sum(t.number < number for t in busy) >= n_trials


def run_worker(
    storage_url: str,
    study_name: str,
    objective: Callable[[dict[str, float | None], int], Mapping[str, Any]],
    n_trials: int,
    worker_id: int | str = 0,
    seed: int = 0,
    sampler_kwargs: Mapping[str, Any] | None = None,
    max_failures: int = 3,
    *,
    n_layers: int,
    space: Mapping[str, Any],
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    progress: bool = True,
    stop_dominated: bool = False,
    ledger: str | os.PathLike | None = None,
    refusal_constraint: float | None = None,
) -> dict[str, Any]:
    """Run trials until the study holds ``n_trials`` COMPLETE trials; safe to restart and to run
    in several processes at once (each with its own ``worker_id``).

    ``sampler_kwargs`` are TPESampler arguments, merged over :data:`DEFAULT_SAMPLER_KWARGS`.

    ``objective(params, trial_number)`` gets the flat absolute parameters of
    :func:`suggest_params` and returns at least ``refusals`` (int) and ``kl`` (float); every
    returned key is stored as a user attribute (``n``, timings, ...). With ``stop_dominated`` it
    is called as ``objective(params, trial_number, refusal_cap(study))`` (see :func:`refusal_cap`)
    and may return ``dominated_by`` (a trial number) with a lower-bound ``refusals``. With
    ``refusal_constraint`` (a share of ``n``, which the objective must then return) a trial refusing
    more is infeasible to the sampler.

    Restart (:func:`_open_worker`), the budget across workers (:func:`_ask`) and failures
    (:func:`_evaluate`) are described where they happen. With ``ledger`` (a
    :class:`abliterate.study_ledger.Ledger` path) a lost or older database is refused before anything
    is written to it, and the count is recorded after every completed trial.

    Returns ``{"worker", "n_complete", "n_failed", "n_surplus", "study_n_complete", "seconds"}``
    (counts of this call except ``study_n_complete``).
    """
    from tqdm.auto import tqdm

    sampler_kwargs, space = _checked_inputs(n_trials, n_layers, sampler_kwargs, space, refusal_constraint)
    worker = str(worker_id)
    started = time.perf_counter()
    book, storage, study = _open_worker(storage_url, study_name, ledger, heartbeat_interval, grace_period, worker)
    counts = _Counts()
    complete = len(_count(study, (TrialState.COMPLETE,)))
    if book is not None:
        book.record(storage_url, study_name, complete)
    logger.info("study %s: %d of %d trials complete; worker %s starts", study_name, complete, n_trials, worker)
    bar = tqdm(total=n_trials, initial=min(complete, n_trials), desc=f"trials (worker {worker})", unit="trial",
               disable=not progress, dynamic_ncols=True)
    try:
        while True:
            with study_lock(storage_url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
                if heartbeat_interval is not None:
                    optuna.storages.fail_stale_trials(study)
                if len(_count(study, (TrialState.COMPLETE, TrialState.RUNNING))) >= n_trials:
                    break
                study.sampler = _sampler(seed, worker, len(study.get_trials(deepcopy=False)), sampler_kwargs)
                asked = _ask(study, worker, n_trials, space, n_layers)
            if asked is None:
                counts.surplus += 1
                continue
            trial, params = asked
            extra = (refusal_cap(study),) if stop_dominated else ()
            if not _evaluate(study, storage, trial, params, objective, extra, counts, max_failures, worker,
                             refusal_constraint):
                continue
            complete = len(_count(study, (TrialState.COMPLETE,)))
            if book is not None:
                book.record(storage_url, study_name, complete)
            bar.n = min(complete, n_trials)
            bar.refresh()
    finally:
        bar.close()
    return _summary(study, worker, counts, n_trials, started)


@dataclasses.dataclass
class _Counts:
    """What one worker call did: trials completed, failed, found surplus, and failures in a row."""

    done: int = 0
    failed: int = 0
    surplus: int = 0
    consecutive: int = 0


def _checked_inputs(n_trials: int, n_layers: int, sampler_kwargs: Mapping[str, Any] | None,
                    space: Mapping[str, Any], refusal_constraint: float | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    if int(n_trials) < 1:
        raise ConfigError(f"n_trials must be >= 1, got {n_trials}")
    if int(n_layers) < 1:
        raise ConfigError(f"n_layers must be >= 1, got {n_layers}")
    if refusal_constraint is not None and not 0.0 <= refusal_constraint < 1.0:
        raise ConfigError(f"study.refusal_constraint must be a share in [0, 1), got {refusal_constraint!r}")
    # Merged, not replaced: a caller that sets n_startup_trials keeps multivariate TPE.
    sampler_kwargs = {**DEFAULT_SAMPLER_KWARGS, **(sampler_kwargs or {})}
    if "seed" in sampler_kwargs:
        raise ConfigError("sampler_kwargs must not set 'seed'; pass seed= instead")
    space = copy.deepcopy(dict(space))
    validate_space(space)
    return sampler_kwargs, space


def _open_worker(storage_url: str, study_name: str, ledger, heartbeat_interval, grace_period, worker: str):
    """The ledger (checked), the storage and the study.

    RUNNING trials recorded for this ``worker`` were left by a killed job: they are marked FAIL and
    their parameters queued again, so they are the next trials asked. With heartbeats, any worker
    does the same for silent trials of other workers. Two live workers must never share an id."""
    book = _open_ledger(ledger, storage_url)
    storage = make_storage(storage_url, heartbeat_interval, grace_period)
    with study_lock(storage_url):
        if book is not None:
            book.check(storage_url, study_name, _n_complete(storage, study_name))
        study = load_or_create_study(storage, study_name)
        for trial in _count(study, (TrialState.RUNNING,)):
            if trial.user_attrs.get("worker") == worker:
                _fail_and_requeue(study, trial, f"left RUNNING by a killed job of worker {worker}")
            elif _orphaned(trial):
                _fail_and_requeue(study, trial, "left RUNNING by a worker that died before recording its id")
    return book, storage, study


# A worker asks a trial, then records its id in it: one killed (or whose database server went down)
# between the two leaves a RUNNING trial that no worker owns and no heartbeat will ever fail, and it
# would hold a place in n_trials for good. A live worker records its id milliseconds after asking.
ORPHAN_SECONDS = 2.0


def _orphaned(trial: FrozenTrial) -> bool:
    started = trial.datetime_start
    return ("worker" not in trial.user_attrs and started is not None
            and (datetime.datetime.now() - started).total_seconds() > ORPHAN_SECONDS)


def _ask(study: optuna.Study, worker: str, n_trials: int, space: Mapping[str, Any], n_layers: int):
    """The next trial and its parameters, or None when it was surplus.

    The caller asks only while COMPLETE + RUNNING < ``n_trials``, counted under a file lock for
    SQLite. Without the lock (server databases) two workers can both ask the last trial; the
    later-numbered one is then told FAIL at once, before sampling, with user attribute ``surplus``
    (FAIL, not PRUNED, because samplers ignore failed trials), and its queued parameters, if any,
    are queued again."""
    trial = study.ask()
    try:
        trial.set_user_attr("worker", worker)
    except optuna.exceptions.UpdateFinishedTrialError:
        return None  # a starting worker took it for orphaned (see _orphaned) and failed it: ask again
    if _is_surplus(study, trial.number, n_trials):
        trial.set_user_attr("surplus", True)
        trial.set_user_attr("error", "surplus: other workers filled n_trials")
        frozen = study.tell(trial, state=TrialState.FAIL)
        if frozen.system_attrs.get("fixed_params"):
            _requeue(study, frozen)
        return None
    params = suggest_params(trial, space, n_layers)
    trial.set_user_attr("ablation_params", params)
    return trial, params


def _evaluate(study, storage, trial, params: dict, objective, extra: tuple, counts: _Counts, max_failures: int,
              worker: str, refusal_constraint: float | None = None) -> bool:
    """Run the objective on one trial and tell the study; True when the trial completed.

    An exception from the objective fails the trial (user attribute ``error``) and the loop goes on;
    more than ``max_failures`` in a row raise ``RuntimeError``. On ``KeyboardInterrupt`` or
    ``SystemExit`` the trial is failed and re-queued before re-raising."""
    start = time.perf_counter()
    try:
        with _heartbeat(storage, trial._trial_id):
            result = objective(dict(params), trial.number, *extra)
        refusals, kl, attrs = _check_result(result)
        constraint = (None if refusal_constraint is None
                      else _past_share(refusals, attrs.get("n"), refusal_constraint))
    except Exception as exc:  # a failed trial must not end the study
        seconds = time.perf_counter() - start
        counts.consecutive += 1
        counts.failed += 1
        logger.exception("trial %d failed after %.1f s (%d in a row): %s", trial.number, seconds,
                         counts.consecutive, describe_params(params))
        _finish(study, trial, {"error": f"{type(exc).__name__}: {exc}", "seconds": seconds}, None)
        if counts.consecutive > max_failures:
            raise RuntimeError(f"{counts.consecutive} trials failed in a row (max_failures={max_failures}); "
                               f"last error: {type(exc).__name__}: {exc}") from exc
        return False
    except BaseException:
        _fail_and_requeue(study, study._storage.get_trial(trial._trial_id), "interrupted")
        raise
    seconds = time.perf_counter() - start
    stored = {f"objective_{k}" if k in _RESERVED_ATTRS else k: v for k, v in attrs.items()}
    stored["seconds"] = seconds
    counts.consecutive = 0
    if not _finish(study, trial, stored, [refusals, kl], constraint):
        return False
    counts.done += 1
    n, dominated = attrs.get("n"), attrs.get(DOMINATED_BY)
    logger.info("trial %d [worker %s] %s | refusals %s%s KL %.4g%s | %.1f s", trial.number, worker,
                describe_params(params), ">=" if dominated is not None else "",
                f"{refusals}/{n}" if n is not None else refusals, kl,
                f" (dominated by trial {dominated}: stopped)" if dominated is not None else "", seconds)
    return True


CONSTRAINT = "refusal_share"


def _past_share(refusals: int, n: int | None, share: float) -> float:
    """How far a trial refuses past ``share`` of its ``n`` prompts: the constraint TPE reads
    (> 0: infeasible).

    The margin matches the export's comparison, so a trial exactly at the target is feasible. A
    trial stopped once dominated has a lower bound for its refusals, which may call it feasible; it
    is dominated either way, so it never joins TPE's good group ahead of the trial dominating it."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the objective returned n={n!r}; a refusal constraint needs the prompt count")
    from abliterate.selection import RATE_SLACK  # pandas with it: not at import (the trials rule starts faster)

    return refusals / n - share - RATE_SLACK


def _summary(study: optuna.Study, worker: str, counts: _Counts, n_trials: int, started: float) -> dict[str, Any]:
    complete = len(_count(study, (TrialState.COMPLETE,)))
    summary = {"worker": worker, "n_complete": counts.done, "n_failed": counts.failed, "n_surplus": counts.surplus,
               "study_n_complete": complete, "seconds": time.perf_counter() - started}
    logger.info("worker %s done: %d trials complete, %d failed, study has %d/%d (%.1f s)", worker, counts.done,
                counts.failed, complete, n_trials, summary["seconds"])
    return summary


# --------------------------------------------------------------------------- reading a study


def trials_frame(storage_url: str, study_name: str, ledger: str | os.PathLike | None = None):
    """One row per trial: number, state, refusals, kl, n, seconds, worker, error, retry_of,
    direction_scope, the flat absolute parameters, other user attributes, datetime_start and
    datetime_complete. Rows are sorted by trial number."""
    import pandas as pd

    study = _load_study(storage_url, study_name, ledger)
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = dict(trial.user_attrs)
        params = attrs.pop("ablation_params", None) or {}
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "refusals": int(trial.values[0]) if trial.values else None,
            "kl": float(trial.values[1]) if trial.values else None,
            "n": attrs.pop("n", None),
            "seconds": attrs.pop("seconds", None),
            "worker": attrs.pop("worker", None),
            "error": attrs.pop("error", None),
            "retry_of": attrs.pop("retry_of", None),
            DOMINATED_BY: attrs.pop(DOMINATED_BY, None),
            "direction_scope": trial.params.get("direction_scope"),
        }
        if row["direction_scope"] is None and params:
            # a space with one scope does not sample it: read it off the applied parameters
            row["direction_scope"] = "global" if params.get("direction_index") is not None else "per_layer"
        row.update(params)
        row.update({k: v for k, v in attrs.items() if k not in row})  # refusals and kl are in row
        row["datetime_start"] = trial.datetime_start
        row["datetime_complete"] = trial.datetime_complete
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["number", "state", "refusals", "kl", "n", "seconds", "worker"])
    df["refusals"] = df["refusals"].astype("Int64")
    df["n"] = pd.to_numeric(df["n"]).astype("Int64")
    df["retry_of"] = pd.to_numeric(df["retry_of"]).astype("Int64")
    df[DOMINATED_BY] = pd.to_numeric(df[DOMINATED_BY]).astype("Int64")
    tail = ["datetime_start", "datetime_complete"]
    df = df[[c for c in df.columns if c not in tail] + tail]
    return df.sort_values("number").reset_index(drop=True)


def study_stats(storage_url: str, study_name: str, ledger: str | os.PathLike | None = None) -> dict[str, Any]:
    """Counts by state and time: ``seconds`` sums the durations of COMPLETE trials,
    ``wall_seconds`` spans from the first start to the last finish of any finished trial."""
    study = _load_study(storage_url, study_name, ledger)
    trials = study.get_trials(deepcopy=False)
    by_state = {state: [t for t in trials if t.state == state] for state in TrialState}
    failed = by_state[TrialState.FAIL]
    finished = [t for t in trials if t.datetime_start and t.datetime_complete]
    wall = 0.0
    if finished:
        last, first = max(t.datetime_complete for t in finished), min(t.datetime_start for t in finished)
        wall = (last - first).total_seconds()
    return {
        "n_complete": len(by_state[TrialState.COMPLETE]),
        "n_failed": sum(not t.user_attrs.get("surplus") for t in failed),
        "n_surplus": sum(bool(t.user_attrs.get("surplus")) for t in failed),
        "n_dominated": sum(DOMINATED_BY in t.user_attrs for t in by_state[TrialState.COMPLETE]),
        "n_running": len(by_state[TrialState.RUNNING]),
        "n_waiting": len(by_state[TrialState.WAITING]),
        "seconds": sum(t.duration.total_seconds() for t in by_state[TrialState.COMPLETE] if t.duration),
        "wall_seconds": wall,
    }
