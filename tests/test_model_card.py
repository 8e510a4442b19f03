"""The model cards of the released folders: metadata, the held-out figures as summary.json has them,
optional keys shown or left out, the source's licence read or admitted unknown, and the release step."""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

import pytest
import workflow_runner as wr
from abliterate import model_card, rule_settings
from abliterate.model_source import ModelSource, Resolved, resolve
from abliterate.steps import release
from snakemake.utils import validate

# summary.json and selected.json of tests/test_workflow.py's full run on the tiny model (copied as written)
DATA = Path(__file__).parent / "data" / "tiny_run"
REQUIRED = {"license", "tags", "pipeline_tag", "library_name"}


def _read(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _facts(**changes) -> model_card.CardFacts:
    base = {"run": "tiny", "model": "/models/tiny", "base_model": None, "seed": 0, "policy": "knee",
            "licence": model_card.Licence(None, "no card"), "refusal_target": 0.1, "confirm": True, "trial": None}
    return model_card.CardFacts(**{**base, **changes})


def _row(card: str, prompts: str, metric: str) -> list[str]:
    (row,) = [line for line in card.splitlines() if line.startswith(f"| {prompts}") and f"| {metric} |" in line]
    return [cell.strip() for cell in row.strip("|").split("|")[2:4]]


def _gguf(path: Path, licence: str | None) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    if licence:
        writer.add_license(licence)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", sorted(model_card.KINDS))
def test_the_card_reports_the_held_out_figures_of_summary_json(kind):
    summary, selected = _read("summary.json"), _read("selected.json")
    card = model_card.render(kind, selected, summary, _facts(base_model="someone/tiny",
                                                             licence=model_card.Licence("mit", "its card")))
    meta = model_card.front_matter(card)
    assert REQUIRED | {"base_model"} <= set(meta)
    assert meta == {**meta, "base_model": "someone/tiny", "license": "mit", "pipeline_tag": "text-generation",
                    "library_name": model_card.KINDS[kind]}
    assert {"abliterated", "uncensored", "abliterate"} <= set(meta["tags"])
    base, merged = summary["baseline"], summary["merged"]
    for prompts, split in (("held-out harmful", "heldout"), ("eval harmful", "eval")):
        got = [cell.split()[0] for cell in _row(card, prompts, "refusals")]
        assert got == [f"{base[split]['refusals']}/{base[split]['n']}", f"{merged[split]['refusals']}/{merged[split]['n']}"]
    got = [cell.split()[0] for cell in _row(card, "held-out harmless", "refusals")]
    assert got == [f"{s['refusals']}/{s['n']}" for s in (base["harmless_heldout"], merged["harmless_heldout"])]
    for prompts, split in (("held-out harmless", "heldout"), ("eval harmless", "eval")):
        assert float(_row(card, prompts, "first-token KL vs. the original")[1]) == pytest.approx(
            merged[split]["kl"], abs=5e-5)
    assert "eval harmful (the study optimised on these)" in card
    assert f"{summary['study']['n_complete']} complete trials" in card
    assert f"Trial {selected['number']}, chosen by: {selected['reason']}" in card
    assert json.dumps(selected["params"], indent=2) in card and "seed: 0" in card
    assert f"torch {summary['versions']['torch']}" in card
    assert {"adapter": "PeftModel.from_pretrained", "merged": "AutoModelForCausalLM", "gguf": "llama-cli"}[kind] in card


def test_missing_optional_keys_are_left_out_and_new_ones_shown():
    summary, selected = _read("summary.json"), _read("selected.json")
    for key in ("versions", "study", "config_hash", "evaluated", "timings_s"):
        summary.pop(key, None)
    summary["merged"].pop("harmless_heldout")
    selected.pop("confirmation", None)
    summary["merged"]["heldout"]["answer_kl"] = 0.25  # what another rule may add
    summary["baseline"]["heldout"]["judge_refusals"] = 7
    card = model_card.render("merged", selected, summary, _facts())
    assert "complete trials" not in card and "packages:" not in card and "config hash" not in card
    assert _row(card, "held-out harmless", "refusals")[1] == "—"
    assert _row(card, "heldout", "answer_kl") == ["—", "0.25"]
    assert _row(card, "heldout", "judge_refusals") == ["7", "—"]
    assert "no trial was measured again" in card  # export.confirm on, nothing confirmed


def test_before_evaluation_the_card_says_it_knows_no_held_out_figures():
    selected = _read("selected.json")
    card = model_card.render("merged", selected, None, _facts())
    assert "Not evaluated yet" in card and "held-out harmful" not in card
    assert f"{selected['eval']['refusals']}/{selected['eval']['n']}" in card


def test_a_named_trial_and_no_confirmation_are_said_so():
    selected = _read("selected.json")
    card = model_card.render("adapter", selected, _read("summary.json"), _facts(trial=3))
    assert "export.trial: 3" in card
    card = model_card.render("adapter", {**selected, "confirmation": None}, None, _facts(confirm=False))
    assert "Policy `knee` with a refusal target of 10%" in card and "export.confirm: false" in card


def test_an_unknown_licence_is_stated_never_invented():
    card = model_card.render("merged", _read("selected.json"), _read("summary.json"),
                             _facts(licence=model_card.Licence(None, "/models/tiny has no model card")))
    meta = model_card.front_matter(card)
    assert (meta["license"], meta["license_name"]) == ("other", "unknown") and "base_model" not in meta
    assert "Unknown: /models/tiny has no model card" in card
    with pytest.raises(ValueError, match="unknown folder kind"):
        model_card.render("onnx", _read("selected.json"), None, _facts())


def test_the_licence_comes_from_gguf_metadata(tmp_path):
    with_licence = resolve(ModelSource(path=str(_gguf(tmp_path / "a.gguf", "apache-2.0"))))
    assert model_card.source_licence(with_licence) == model_card.Licence("apache-2.0", "general.license of a.gguf")
    without = model_card.source_licence(resolve(ModelSource(path=str(_gguf(tmp_path / "b.gguf", None)))))
    assert without.id is None and "sets no general.license" in without.source


def test_the_licence_comes_from_the_source_folder_card(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    res = resolve(ModelSource(path=str(tmp_path)))
    assert model_card.source_licence(res).id is None  # no README.md
    (tmp_path / "README.md").write_text("# a model\nlicense: mit (not metadata)\n")
    assert model_card.source_licence(res).id is None
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# a model\n")
    assert model_card.source_licence(res) == model_card.Licence("apache-2.0", f"the model card of {tmp_path}")
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: qwen-research\n---\n")
    assert model_card.source_licence(res).id == "qwen-research"
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert model_card.source_licence(res).id is None  # metadata that does not parse: unknown, no crash


def _release_settings(model_path: Path) -> dict:
    config = copy.deepcopy(wr.tiny_config(model_path))
    validate(config, str(rule_settings.SCHEMA))
    return rule_settings.settings(config, "release")


def test_the_release_links_each_folder_and_writes_its_card(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "README.md").write_text("---\nlicense: mit\n---\n")
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "sub" / "tokenizer.json").write_text("{}")
    (model / "README.md").write_text("the merge-time card")
    (model / ".snakemake_timestamp").write_text("")
    os.chmod(model / "model.safetensors", 0o444)  # protected(): a link must not make it writable
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    _gguf(gguf_dir / "tiny.gguf", None)
    out = tmp_path / "release"
    record = release.run(_release_settings(source), {"model": str(model), "gguf": str(gguf_dir)},
                         str(DATA / "summary.json"), str(DATA / "selected.json"), str(out), "abc")
    assert sorted(p.name for p in out.iterdir()) == ["gguf", "model", "release.json"]
    assert sorted(str(p.relative_to(out / "model")) for p in (out / "model").rglob("*") if p.is_file()) == [
        "README.md", "model.safetensors", "sub/tokenizer.json"]
    assert (out / "model" / "model.safetensors").samefile(model / "model.safetensors")
    assert stat.S_IMODE((model / "model.safetensors").stat().st_mode) == 0o444
    assert (model / "README.md").read_text() == "the merge-time card"  # the source folder is untouched
    meta = model_card.front_matter((out / "model" / "README.md").read_text())
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    assert model_card.front_matter((out / "gguf" / "README.md").read_text())["library_name"] == "gguf"
    assert record == json.loads((out / "release.json").read_text())
    assert record["licence"] == "mit" and set(record["folders"]) == {"model", "gguf"}


def test_the_licence_comes_from_a_hub_models_cached_card(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someone--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: llama3.2\n---\n")
    (tmp_path / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "models--someone--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = Resolved("someone/tiny", None, None, "hub", "someone/tiny")
    assert model_card.source_licence(hub) == model_card.Licence("llama3.2", "the model card of someone/tiny")
    other = Resolved("someone/other", None, None, "hub", "someone/other")
    assert model_card.source_licence(other).id is None  # not cached, offline: unknown, no download tried
