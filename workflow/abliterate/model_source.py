"""Where a model comes from: a hub id, a local folder, or a GGUF file (also one shipped inside an
installed Python package), resolved to what ``from_pretrained`` takes.

Torch-free on purpose: the workflow resolves the configured model while Snakemake parses it (to
check it before any job and to name a GGUF file as a rule input), and the jobs load through the
same function, so both always agree on which file a config means.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError
from .packages import package_file

GGUF_MAGIC = b"GGUF"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. Exactly one of hub id / local folder / GGUF is meant by ``path``."""

    path: str  # hub id, local folder, or .gguf file ("" when ``package`` holds the file)
    revision: str | None = None
    gguf_file: str | None = None  # file name inside ``path`` or inside ``package``
    package: str | None = None  # an installed Python package that ships ``gguf_file``
    trust_remote_code: bool = False
    label: str | None = None  # what logs and metadata call it, when not its path (a converted GGUF)

    @classmethod
    def from_config(cls, model_cfg: dict) -> ModelSource:
        return cls(path=str(model_cfg.get("path") or ""), revision=model_cfg.get("revision"),
                   gguf_file=model_cfg.get("gguf_file"), package=model_cfg.get("package"),
                   trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))


@dataclass(frozen=True)
class Resolved:
    """A source resolved to what ``from_pretrained`` takes."""

    location: str  # hub id or local folder
    gguf_file: str | None
    revision: str | None
    kind: str  # "hub", "local", "gguf"
    description: str  # for logs, metadata and model cards

    @property
    def gguf_path(self) -> str | None:
        """The GGUF file itself; None for other models."""
        return str(Path(self.location) / self.gguf_file) if self.gguf_file else None


def check_gguf(path: Path) -> None:
    """Fail early, naming the file, when a .gguf file is not GGUF at all (a download page, a stub)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                             "re-download or re-install it")


def resolve(source: ModelSource) -> Resolved:
    """Turn a configured source into a location; raise if a local file or package is missing."""
    if source.package:
        if not source.gguf_file:
            raise ModelLoadError("model.package is set but model.gguf_file is not: name the GGUF file it ships")
        file = package_file(source.package, source.gguf_file, "model")
        check_gguf(file)
        return Resolved(str(file.parent), source.gguf_file, None, "gguf",
                        f"{source.package}/{source.gguf_file} (package)")
    path = source.path
    if not path:
        raise ModelLoadError("model.path is empty: give a hub id, a local folder or a .gguf file")
    p = Path(path)
    if path.endswith(".gguf"):
        if not p.is_file():
            raise ModelLoadError(f"GGUF file {path!r} (model.path) does not exist")
        check_gguf(p)
        return Resolved(str(p.parent), p.name, None, "gguf", str(p))
    if source.gguf_file:
        if not (p / source.gguf_file).is_file():
            raise ModelLoadError(f"GGUF file {source.gguf_file!r} (model.gguf_file) not found in {path!r}")
        check_gguf(p / source.gguf_file)
        return Resolved(str(p), source.gguf_file, None, "gguf", f"{path}/{source.gguf_file}")
    if _looks_local(path):
        if not p.exists():
            raise ModelLoadError(f"local model folder {path!r} (model.path) does not exist (relative paths are "
                                 f"read from the working folder {Path.cwd()})")
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"local model folder {path!r} (model.path) has no config.json")
        return Resolved(str(p), None, None, "local", source.label or str(p))
    if not HUB_ID.fullmatch(path):
        raise ModelLoadError(f"model.path {path!r} is neither an existing local folder nor a hub id (owner/name)")
    _check_offline_cache(path, source.revision)
    description = f"{path}@{source.revision}" if source.revision else path
    return Resolved(path, None, source.revision, "hub", description)


def _looks_local(path: str) -> bool:
    """A path, not a hub id: it exists, is written as a path (``./``, ``/``, ``~``, more than one
    ``/``), or its first part is a folder here (``models/qwen`` with ``models/`` present). Only a
    name that could be nothing but a hub id goes to the hub, so a mistyped local folder is reported
    as missing instead of as a failed download."""
    if Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        return True
    return "/" in path and Path(path.split("/", 1)[0]).is_dir()


def _offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _check_offline_cache(repo_id: str, revision: str | None) -> None:
    """With the hub switched off, a hub id must already be in the local cache (its config.json)."""
    if not _offline():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision or "main")
    if not isinstance(found, str):
        raise ModelLoadError(
            f"model.path {repo_id!r} is a hub id, but the hub is switched off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) "
            f"and its cache ({constants.HF_HUB_CACHE}) holds no copy{' at revision ' + revision if revision else ''}: "
            f"download it first (hf download {repo_id}), unset HF_HUB_OFFLINE, or set model.path to a local folder"
            + (f" (as a folder, {repo_id!r} does not exist in {Path.cwd()})" if "/" in repo_id else ""))
