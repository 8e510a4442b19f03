"""Run the real workflow (Snakemake as a subprocess) on a tiny model in a temporary folder."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(model_path: Path, **overrides) -> dict:
    cfg = {
        "run": "tiny",
        "seed": 0,
        "model": {"path": str(model_path)},
        "prompts": {
            "harmful": {"source": "package", "package": "uncensorbench", "path": "data/prompts.json",
                        "records": "prompts", "column": "prompt", "group": "topic",
                        "splits": {"train": 0.1, "eval": 0.06, "heldout": 0.06, "demo": 0.0}},
            "harmless": {"source": "package", "package": "abliterate", "path": "data/harmless_prompts.json",
                         "records": "prompts", "column": "prompt", "group": "topic",
                         "splits": {"train": 0.03, "eval": 0.02, "heldout": 0.02, "demo": 0.0}},
        },
        "directions": {"batch_size": 8},
        "evaluation": {"max_new_tokens": 8, "batch_size": 8, "heldout_max_new_tokens": 16},
        "study": {"n_trials": 3, "n_startup_trials": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(workdir: Path, cfg: dict) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake_cmd(workdir: Path, *args: str, cores: int = 2) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--cores", str(cores), *args]


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("ABLITERATE_DEVICE", "cpu")
    e.setdefault("HF_HUB_OFFLINE", "1")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def run(workdir: Path, *args: str, cores: int = 2, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(snakemake_cmd(workdir, *args, cores=cores), capture_output=True, text=True,
                          timeout=timeout, env=env(), check=False)
    if check and proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "results/logs").rglob("*.log")))
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stderr[-6000:]}\n{logs}")
    return proc


def start(workdir: Path, *args: str, output: Path) -> subprocess.Popen:
    """Snakemake in the background, in its own process group (so a kill takes its jobs too)."""
    with open(output, "w") as out:
        return subprocess.Popen(snakemake_cmd(workdir, *args), env=env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group: snakemake and its job."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
