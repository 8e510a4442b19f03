"""Atomic writers and provenance helpers.

Every artifact is written to a temporary file in its destination folder and then moved into place
with ``os.replace``, so a killed job never leaves a half-written file that a later rule could read.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DamagedFileError

if TYPE_CHECKING:  # torch is imported lazily: CPU-only rules (prompts, trials) start seconds faster
    import torch

SCHEMA_VERSION = "1"

logger = logging.getLogger(__name__)


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (``os.umask`` can only
    set it, and setting it briefly races with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(dest: Path) -> int:
    """The mode a plain ``open(dest, "w")`` would leave: an existing file keeps its own, a new one gets
    0666 less the umask. ``mkstemp`` makes temporaries private (0600), which would otherwise leave
    every artifact unreadable to anyone but its owner."""
    if dest.is_file():
        return dest.stat().st_mode & 0o7777
    return 0o666 & ~_umask()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``<path>.lock``, held for the ``with`` block; it serialises
    processes on one machine (and on network file systems whose locks work)."""
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _temporary_prefix(dest: Path) -> str:
    return f".{dest.name}."


def _is_temporary_of(name: str, dest: Path, suffix: str) -> bool:
    """``mkstemp``/``mkdtemp``'s names: the prefix, eight characters, the suffix (nothing else, so the
    temporary of ``model.safetensors`` is never taken for one of ``model``)."""
    return re.fullmatch(re.escape(_temporary_prefix(dest)) + r"[a-z0-9_]{8}" + re.escape(suffix), name) is not None


def remove_stale_temporaries(dest: str | os.PathLike, suffix: str = "") -> list[Path]:
    """Remove what an earlier, killed writer of ``dest`` left beside it (``.<name>.<random>``).

    Only one writer of a destination runs at a time (Snakemake runs one job per output and holds
    its directory lock; files several workers share are written under a lock), so every such
    temporary belongs to a writer that is gone. A SIGKILL skips the ``finally`` below; for a merged
    model that is a full-size copy.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed = []
    for stale in dest.parent.glob(f"{glob.escape(_temporary_prefix(dest))}*"):
        if not _is_temporary_of(stale.name, dest, suffix):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    if removed:
        logger.warning("removed %d temporary file(s) a killed writer of %s left: %s", len(removed), dest,
                       ", ".join(p.name for p in removed))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it over ``path``, else remove it.

    The result has the permissions a plain write would give it (see :func:`_normal_mode`)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix or dest.suffix
    remove_stale_temporaries(dest, suffix)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(dest), suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _normal_mode(dest))
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` as a whole, the folder
    and everything in it with the permissions ``mkdir`` and a plain write give under the umask."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(dest), dir=dest.parent))
    try:
        yield tmp
        # mkdtemp made the folder 0700, and safetensors' save_file creates its files 0600 itself
        mask = _umask()
        for inner in [tmp, *tmp.rglob("*")]:
            # a hard link shares its mode with another rule's output (abliterate.steps.release): leave it
            if not inner.is_symlink() and (inner.is_dir() or inner.stat().st_nlink == 1):
                os.chmod(inner, (0o777 if inner.is_dir() else 0o666) & ~mask)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def jsonable(obj: Any) -> Any:
    """What ``json`` cannot write, as what it can: a path as text, a tensor (moved to the CPU first) or
    a numpy array as lists, a scalar as its number; ``TypeError`` for anything else."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach"):  # a torch.Tensor, maybe on the GPU (this module does not import torch)
        obj = obj.detach().cpu()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(df, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a DataFrame as Parquet with string metadata stored in the file's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    for key, value in (metadata or {}).items():
        meta[f"abliterate.{key}".encode()] = str(value).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_csv(df, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> None:
    """Save tensors (moved to CPU, made contiguous) with string metadata, atomically."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"abliterate_schema": SCHEMA_VERSION}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=meta)


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Return ``(tensors, metadata)``; metadata values that were JSON are decoded."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - a safetensors handle
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors' own error type differs between its versions
        raise DamagedFileError(f"{path} cannot be read ({type(exc).__name__}: {exc}); it is damaged or "
                               "truncated: delete it and rerun, so the rule that writes it runs again") from exc
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    return tensors, meta


def sha256_texts(texts: list[str]) -> str:
    """Order-sensitive hash of a prompt list (what a direction was computed from)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-serialisable config fragment (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
