"""Heretic's own virtual environment for the side-by-side benchmark.

Heretic (`heretic-llm`, AGPL-3.0) is called, never vendored: it lives in
`benchmarks/.venv-heretic/` (gitignored), separate from our environment, so
its pins (optuna 4.x, transformers 5.x, datasets, lm-eval) cannot disturb ours.

Torch goes in first, pinned to the CPU build, and stays pinned through a pip
constraints file while Heretic's dependencies resolve: an unpinned resolve of
bitsandbytes / lm-eval would otherwise pull a CUDA torch (gigabytes).

    python benchmarks/heretic_env.py            # create or check, print python path
"""

import json
import logging
import os
import subprocess
import tempfile
import venv
from pathlib import Path

logger = logging.getLogger(__name__)

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_VENV = BENCHMARKS / ".venv-heretic"
TORCH_VERSION = "2.13.0"
HERETIC_VERSION = "1.4.0"

_PROBE = """
import json
from importlib.metadata import version, PackageNotFoundError
out = {}
for name in ("torch", "heretic-llm", "transformers", "optuna", "peft", "datasets"):
    try:
        out[name] = version(name)
    except PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""


def venv_python(venv_dir: Path = DEFAULT_VENV) -> Path:
    return Path(venv_dir) / "bin" / "python"


def installed_versions(venv_dir: Path = DEFAULT_VENV) -> dict[str, str | None]:
    """Package versions inside the venv, or {} when it has no interpreter."""
    python = venv_python(venv_dir)
    if not python.exists():
        return {}
    result = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def _pip(python: Path, *args: str) -> None:
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    logger.info("running: %s", " ".join(command))
    subprocess.run(command, check=True)


def ensure_heretic_env(
    venv_dir: Path = DEFAULT_VENV,
    *,
    torch_version: str = TORCH_VERSION,
    heretic_version: str = HERETIC_VERSION,
) -> Path:
    """Create or repair the Heretic venv; returns its python. Idempotent."""
    venv_dir = Path(venv_dir)
    python = venv_python(venv_dir)
    versions = installed_versions(venv_dir)
    torch_ok = (versions.get("torch") or "").split("+")[0] == torch_version
    heretic_ok = versions.get("heretic-llm") == heretic_version
    if torch_ok and heretic_ok:
        logger.info("heretic venv ready at %s: %s", venv_dir, versions)
        return python

    if not python.exists():
        logger.info("creating venv %s", venv_dir)
        venv.EnvBuilder(with_pip=True, clear=False).create(venv_dir)

    if not torch_ok:
        # The global pip config points at the CPU wheel index; the pin keeps
        # pip from choosing a CUDA build from PyPI proper.
        _pip(python, f"torch=={torch_version}")

    if not heretic_ok:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(f"torch=={torch_version}\n")
            constraints = f.name
        try:
            _pip(python, "-c", constraints, f"heretic-llm=={heretic_version}")
        finally:
            os.unlink(constraints)

    versions = installed_versions(venv_dir)
    if (versions.get("torch") or "").split("+")[0] != torch_version:
        raise RuntimeError(
            f"torch in {venv_dir} is {versions.get('torch')}, wanted {torch_version}"
        )
    if versions.get("heretic-llm") != heretic_version:
        raise RuntimeError(
            f"heretic-llm in {venv_dir} is {versions.get('heretic-llm')}, wanted {heretic_version}"
        )
    logger.info("heretic venv ready at %s: %s", venv_dir, versions)
    return python


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Create or check Heretic's venv; prints its python.")
    # argparse, so that --help is not taken for a folder to build a venv in
    ap.add_argument("venv", nargs="?", type=Path, default=DEFAULT_VENV, help=f"default {DEFAULT_VENV}")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(ensure_heretic_env(args.venv))
