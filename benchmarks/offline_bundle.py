"""Everything protocol `gpu` needs on a GPU machine that has PyTorch but no package index.

    python benchmarks/offline_bundle.py OUT_DIR [--python-version 3.12] [--cuda 130]

Writes, for a CPython of ``--python-version`` on x86-64 Linux:
    wheels/common/   packages both tools import, at one version each (transformers, peft, pydantic,
                     SQLAlchemy...), so that generation speed does not differ by library version
    wheels/ours/     optuna 5 and Snakemake with its dependencies (pulp left out: Snakemake imports
                     it only for its ILP scheduler and falls back to the greedy one, which a
                     one-job-at-a-time workflow uses anyway; 16 MB of solver binaries)
    wheels/heretic/  heretic-llm 1.4.0 and what it needs beyond the common set (optuna 4.x, its pin)
    site/bitsandbytes/  bitsandbytes unpacked with only the CUDA ``--cuda`` build of its library
                     (the wheel carries one per CUDA version: 43 MB instead of about 6)
    tokenizer/       SmolLM2's tokenizer (benchmarks/random_model.py --tokenizer)
    prompts/         a copy of the Arditi et al. prompt splits, when present here
                     (compare.py reads them through ABLITERATE_SHARED_PROMPTS)

The pins are the versions this project's benchmarks ran with on the CPU (our environment and
Heretic's venv); packages the target image already has (torch, numpy, pandas, accelerate,
huggingface_hub, tokenizers, ...) are not bundled. benchmarks/gpu_run.sh installs and runs it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger("offline_bundle")

BENCHMARKS = Path(__file__).resolve().parent

COMMON = [
    "transformers==5.24.0", "peft==0.21.2", "pydantic==2.14.4", "pydantic-core==2.50.5",
    "annotated-types==0.7.0", "typing-inspection==0.4.5", "sqlalchemy==2.1.9", "alembic==1.20.1",
    "mako==1.4.3", "colorlog==6.12.0", "platformdirs==4.14.8",
]
OURS = [
    "optuna==5.0.0", "snakemake==9.27.1", "argparse-dataclass==2.0.0", "conda-inject==1.3.2",
    "configargparse==1.9.0", "connection-pool==0.0.3", "docutils==0.22.4", "dpath==2.2.0",
    "fastjsonschema==2.22.3", "gitdb==4.0.12", "gitpython==3.2.1", "humanfriendly==10.0",
    "immutables==0.21", "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1",
    "jupyter-core==5.9.1", "nbformat==5.11.1", "referencing==0.37.0", "rpds-py==0.30.0",
    "smart-open==7.7.1", "smmap==5.0.3", "snakemake-interface-common==1.23.0",
    "snakemake-interface-executor-plugins==9.4.0", "snakemake-interface-logger-plugins==2.1.0",
    "snakemake-interface-report-plugins==1.3.0", "snakemake-interface-scheduler-plugins==2.0.2",
    "snakemake-interface-storage-plugins==4.4.1", "sqlmodel==0.0.37", "tenacity==9.2.1",
    "throttler==1.2.3", "traitlets==5.15.0", "yte==1.9.4",
]
# What heretic.main imports when it runs (a trace of its imports in its venv), not its whole
# metadata closure: lm-eval's and kernels' optional extras (sigstore and cryptography for kernel
# signatures, nltk, langdetect, rouge...) are never imported by Heretic's abliteration and would
# not fit the 64 MiB a device call carries.
HERETIC = [
    "heretic-llm==1.4.0", "optuna==4.9.0", "chardet==6.0.0.post1", "datasets==4.8.5", "defusedxml==0.7.1",
    "dill==0.4.1", "immutabledict==4.3.1", "kernels==0.17.2", "lm-eval==0.4.13", "more-itertools==11.2.1",
    "multiprocess==0.70.19", "prompt-toolkit==3.0.53", "pydantic-settings==2.16.3", "python-dotenv==1.2.4",
    "pytz==2026.6", "questionary==2.1.1", "tomli-w==1.2.0", "tomlkit==0.15.2", "wcwidth==0.9.4",
]
BITSANDBYTES = "bitsandbytes==0.50.2"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)] + ["manylinux2014_x86_64",
                                                                              "manylinux1_x86_64"]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"], check=True)


def fetch(pins: list[str], dest: Path, python_version: str) -> None:
    """Binary wheels for the target interpreter; pure-Python packages published only as source are
    built into wheels here (a py3-none-any wheel installs anywhere)."""
    dest.mkdir(parents=True, exist_ok=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    for pin in pins:
        try:
            pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                "--implementation", "cp", *platform_args, "-d", str(dest), pin)
        except subprocess.CalledProcessError:
            logger.info("%s: no wheel published, building one (pure Python)", pin)
            pip("wheel", "--no-deps", "-w", str(dest), pin)


def trimmed_bitsandbytes(dest: Path, cuda: str, python_version: str) -> None:
    """bitsandbytes unpacked with its CPU library and the one CUDA build the target's torch loads."""
    with tempfile.TemporaryDirectory() as tmp:
        fetch([BITSANDBYTES], Path(tmp), python_version)
        wheel = next(Path(tmp).glob("bitsandbytes-*.whl"))
        keep = {f"libbitsandbytes_cuda{cuda}.so", "libbitsandbytes_cpu.so"}
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                base = Path(name).name
                if base.startswith("libbitsandbytes_") and base not in keep:
                    continue
                zf.extract(name, dest)
    if not any(dest.glob(f"bitsandbytes/libbitsandbytes_cuda{cuda}.so")):
        raise FileNotFoundError(f"{BITSANDBYTES} has no CUDA {cuda} library")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--cuda", default="130", help="CUDA version of the target's torch, as bitsandbytes names it")
    p.add_argument("--prompts", type=Path, default=Path("/work/shared/data/prompts"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = args.out
    for name, pins in (("common", COMMON), ("ours", OURS), ("heretic", HERETIC)):
        fetch(pins, out / "wheels" / name, args.python_version)
    trimmed_bitsandbytes(out / "site", args.cuda, args.python_version)

    sys.path.insert(0, str(BENCHMARKS))
    import random_model

    random_model.load_tokenizer().save_pretrained(out / "tokenizer")
    if args.prompts.is_dir():
        shutil.copytree(args.prompts, out / "prompts", dirs_exist_ok=True)
    else:
        logger.info("no %s: compare.py will use the workflow's own prompt sets", args.prompts)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    logger.info("bundle at %s: %.1f MiB", out, size / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
