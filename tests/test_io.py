"""Atomic writers: all or nothing, the permissions a plain write gets, and no temporaries left behind."""

from __future__ import annotations

import contextlib
import os
import stat

import pytest
import torch
from abliterate import io
from abliterate.errors import DamagedFileError


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_new_files_and_folders_get_the_umask_s_permissions(tmp_path, mask):
    with umask(mask):
        io.write_json({"a": 1}, tmp_path / "summary.json")
        io.write_text("x", tmp_path / "card.md")
        io.save_safetensors({"t": torch.zeros(2)}, tmp_path / "t.safetensors")
        with io.atomic_dir(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "private.safetensors").write_text("x")
            os.chmod(tmp / "private.safetensors", 0o600)  # what safetensors' save_file leaves
        plain_file = tmp_path / "plain.txt"
        plain_file.write_text("x")
        (tmp_path / "plain_dir").mkdir()
    for name in ("summary.json", "card.md", "t.safetensors"):
        assert _mode(tmp_path / name) == _mode(plain_file) == 0o666 & ~mask, name
    assert _mode(tmp_path / "model") == _mode(tmp_path / "plain_dir") == 0o777 & ~mask
    assert _mode(tmp_path / "model/private.safetensors") == 0o666 & ~mask


def test_rewriting_a_file_keeps_its_mode_as_a_plain_write_does(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    io.write_json({"a": 1}, path)
    assert _mode(path) == 0o640 and io.read_json(path) == {"a": 1}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    io.write_json({"old": True}, path)
    with pytest.raises(RuntimeError), io.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError), io.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert io.read_json(path) == {"old": True}


def test_a_killed_writer_s_temporaries_go_when_the_output_is_written_again(tmp_path):
    # what SIGKILL leaves: mkdtemp/mkstemp names beside the destination
    (tmp_path / ".model.k1ll3d_x").mkdir()
    (tmp_path / ".model.k1ll3d_x" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".summary.json.abcd1234.json").write_text("{")
    # not temporaries of those outputs: another output's, and a user's hidden file
    (tmp_path / ".model.safetensors.abcd1234.safetensors").write_bytes(b"other")
    (tmp_path / ".model.keep").write_text("mine")
    with io.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    io.write_json({}, tmp_path / "summary.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".model.keep", ".model.safetensors.abcd1234.safetensors", "model", "summary.json"]


def test_a_truncated_safetensors_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "directions.safetensors"
    io.save_safetensors({"directions": torch.randn(5, 64)}, path, {"layers": 4})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFileError, match=r"directions\.safetensors.*delete it and rerun"):
        io.load_safetensors(path)
    with pytest.raises(FileNotFoundError):
        io.load_safetensors(tmp_path / "missing.safetensors")
