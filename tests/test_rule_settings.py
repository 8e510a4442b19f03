"""What each rule reads (abliterate.rule_settings): a changed key reruns exactly its readers and what
follows them, and the study's name changes exactly when what it makes can change."""

from __future__ import annotations

import copy
import dataclasses
import re
import subprocess
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import workflow_runner as wr
import yaml
from abliterate import rule_settings as rs
from abliterate.errors import ConfigError
from snakemake.utils import validate
from tiny_tokenizer import CHATML, YES_NO_MERGES, tiny_model_dir

SCHEMA = wr.REPO / "workflow" / "schemas" / "config.schema.yaml"

# What follows each rule in a run of a local model (no demo or GGUF model to make).
DOWNSTREAM = {
    "prompts": {"baseline", "directions", "study", "export", "evaluate"},
    "baseline": {"study", "evaluate"},
    "directions": {"study", "export"},
    "study": {"trials"},
    "trials": {"export", "evaluate"},
    "export": {"merge", "evaluate", "release"},
    "merge": {"evaluate", "release"},
    "evaluate": {"release"},
    "release": set(),
    "gguf_export": {"release"},  # planned only when merge.gguf asks for the file
}
_MODEL = {"baseline", "directions", "study", "export", "evaluate"}
_EVAL = {"baseline", "study", "export", "evaluate"}
_STUDY = {"study"}

# Every key of the schema: (a new valid value, the rules that read it), read off the steps. A
# function of the work folder where the value is a path.
CHANGES: dict[str, tuple] = {
    "seed": (1, {"prompts", "study", "export", "release"}),
    "model.revision": ("main", _MODEL | {"merge", "release"}),
    "model.trust_remote_code": (True, _MODEL | {"merge", "release"}),
    "model.chat_template": (CHATML, _MODEL | {"merge"}),
    "model.system_prompt": ("Be brief.", _MODEL),
    "model.dtypes": (["float32"], _MODEL),
    "model.cpu_half": (True, _MODEL),
    "model.device_map": ("auto", _MODEL),
    "model.quantization": ("bnb_8bit", _MODEL),
    # the demo model is not this run's model: nothing reads these
    "demo_model.package": ("other_package", set()),
    "demo_model.gguf_file": ("other.gguf", set()),
    "demo_model.seed": (1, set()),
    "demo_model.epochs": (3, set()),
    "demo_model.lr": (0.001, set()),
    "demo_model.n_variants": (3, set()),
    "demo_model.n_harmless_variants": (3, set()),
    "demo_model.length_window": (4, set()),
    "demo_model.lora_first_layer": (0.5, set()),
    "demo_model.unlikely_refusals": (1, set()),
    "demo_model.unlikely_weight": (0.5, set()),
    "demo_model.min_refusal": (0.5, set()),
    "demo_model.max_harmless_refusal": (0.2, set()),
    **{
        f"prompts.{name}.{key}": (value, {"prompts"})
        for name in ("harmful", "harmless")
        for key, value in {
            "dataset": "someone/prompts",
            "config": "default",
            "split": "test",
            "group": None,
            "splits.train": 0.11,
            "splits.eval": 0.07,
            "splits.heldout": 0.07,
            "splits.demo": 0.01,
            "max.train": 5,
            "max.eval": 5,
            "max.heldout": 5,
            "max.demo": 5,
        }.items()
    },
    "directions.orthogonalize": (True, {"directions"}),
    "directions.refused_only": (True, {"directions"}),
    "directions.winsorize_quantile": (0.99, {"directions"}),
    "directions.batch_size": (4, {"directions"}),
    "directions.n_directions": (2, {"directions"}),
    # directions.refused_only (off by default) reads these too: directions then reruns with them
    "evaluation.max_new_tokens": (9, _EVAL),
    "evaluation.batch_size": (4, _EVAL),
    "evaluation.cuda_graphs": (False, _EVAL),
    "evaluation.markers": (["i can't"], _EVAL),
    # held-out only: the study and the export skip them (rule_settings.SKIPS); the baseline's held-out
    # answers still rerun the chain after it, under the same study name
    "evaluation.heldout_max_new_tokens": (12, {"baseline", "evaluate"}),
    "evaluation.judge": (
        lambda work: {"model": {"path": str(tiny_model_dir(work / "judge", merges=YES_NO_MERGES))}},
        {"evaluate"},
    ),
    "evaluation.kl_tokens": (4, _EVAL),
    "evaluation.kl_top_k": (16, _EVAL),
    "ablation.row_norm": ("none", {"study", "export"}),
    "ablation.route": ("lora", {"study", "export"}),
    "ablation.full_rank": (2, {"study", "export"}),
    "study.n_trials": (4, {"study", "trials"}),
    "study.n_startup_trials": (1, _STUDY),
    "study.n_ei_candidates": (8, _STUDY),
    "study.stop_dominated": (False, _STUDY),
    "study.refusal_constraint": (0.2, _STUDY),
    "study.objective_kl": ("answer", {"study", "export"}),
    "study.workers": (2, _STUDY),
    "study.storage": (
        lambda work: f"sqlite:///{work}/other.sqlite",
        {"study", "trials", "evaluate"},
    ),
    "study.space.direction_scope": (["per_layer"], _STUDY),
    "study.space.direction_index": ([0.3, 0.9], _STUDY),
    "study.space.max_weight": ([0.9, 1.5], _STUDY),
    "study.space.max_weight_position": ([0.5, 1.0], _STUDY),
    "study.space.min_weight": ([0.1, 1.0], _STUDY),
    "study.space.min_weight_distance": ([0.2, 0.6], _STUDY),
    "study.space.n_directions": ([1, 2], _STUDY),
    "study.space.secondary_weight": ([0.0, 0.5], _STUDY),
    "export.policy": ("min_refusals", {"export", "release"}),
    "export.refusal_target": (0.2, {"export", "release"}),
    "export.confirm": (False, {"export", "release"}),
    "export.trial": (0, {"export", "release"}),
    "merge.max_ram_gib": (12, {"merge"}),
    "merge.dtype": ("bfloat16", {"merge"}),
    "merge.adapter_only": (True, {"evaluate"}),  # and no merge job at all
    "merge.gguf": ("f16", {"gguf_export", "release"}),
}
# Keys that choose another model, prompt file or run folder: a different run, not a changed one.
NOT_CHANGED = {"run", "model.path", "model.gguf_file", "model.package"} | {
    f"prompts.{name}.{key}"
    for name in ("harmful", "harmless")
    for key in ("source", "package", "path", "records", "column")
}


def _schema_keys() -> set[str]:
    schema = yaml.safe_load(SCHEMA.read_text())

    def walk(node: dict, prefix: str) -> set[str]:
        if "$ref" in node:
            target = schema
            for part in node["$ref"][2:].split("/"):
                target = target[part]
            node = {**target, **node}
        if node.get("type") == "object" and "properties" in node:
            return set().union(
                *(walk(sub, f"{prefix}{key}.") for key, sub in node["properties"].items())
            )
        return {prefix.rstrip(".")}

    return walk(schema, "")


def _set(config: dict, path: str, value) -> dict:
    out = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def _closure(rules: set[str]) -> set[str]:
    out = set(rules)
    while True:
        more = set().union(*(DOWNSTREAM[r] for r in out)) - out
        if not more:
            return out
        out |= more


def _validated(config: dict) -> dict:
    config = copy.deepcopy(config)
    validate(config, str(SCHEMA))
    return config


def test_every_schema_key_is_in_the_table():
    keys = _schema_keys()
    assert "prompts.harmful.splits.train" in keys and "study.space.direction_index" in keys
    assert keys == set(CHANGES) | NOT_CHANGED


def test_every_key_a_rule_reads_is_a_schema_key():
    keys = {
        k.replace("prompts.harmful.", "prompts.*.").replace("prompts.harmless.", "prompts.*.")
        for k in _schema_keys()
    }
    for rule, paths in rs.READS.items():
        for path in paths:
            assert any(k == path or k.startswith(path + ".") for k in keys | {"prompts.harmful"}), (
                rule,
                path,
            )


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def test_each_rule_settings_are_typed_frozen_and_exactly_its_slice():
    config = _validated(yaml.safe_load((wr.REPO / "config.yaml").read_text()))
    for rule in rs.READS:
        sliced = rs.settings(config, rule)
        typed = rs.typed(rule, sliced)
        assert _plain(typed) == sliced, rule  # every key it reads, and nothing else
        assert rs.typed(rule, typed) is typed
    study = rs.typed("study", rs.settings(config, "study"))
    assert isinstance(study.study, rs.Section) and isinstance(study.model.dtypes, tuple)
    assert (
        type(study.model).__dataclass_fields__["revision"].type == str | None
    )  # the schema's type
    assert study.study.n_ei_candidates == config["study"]["n_ei_candidates"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.seed = 1
    with pytest.raises(TypeError):
        study.study.space["max_weight"] = [0, 1]  # nested values are read-only too
    with pytest.raises(KeyError):
        study["export"]  # a key the study does not read
    with pytest.raises(ConfigError, match="rule merge at the top"):
        rs.typed("merge", study)  # another rule's settings are checked like a plain slice


def test_a_settings_slice_with_a_missing_or_an_extra_key_is_refused():
    config = _validated(yaml.safe_load((wr.REPO / "config.yaml").read_text()))
    sliced = rs.settings(config, "merge")
    with pytest.raises(ConfigError, match=r"rule merge at merge: \['dtype'\] missing"):
        rs.typed("merge", {**sliced, "merge": {"max_ram_gib": 8}})
    with pytest.raises(ConfigError, match=r"at the top: \['seed'\] beyond what its step reads"):
        rs.typed("merge", {**sliced, "seed": 1})


def test_the_study_name_follows_what_the_study_makes(tiny_model_path):
    config = _validated(wr.tiny_config(tiny_model_path))
    name = rs.study_name(config)
    for path, value in (
        ("study.n_trials", 99),
        ("study.workers", 2),
        ("ablation.route", "lora"),
        ("evaluation.cuda_graphs", False),
        ("evaluation.heldout_max_new_tokens", 256),
        ("evaluation.judge", {"model": {"path": str(tiny_model_path)}}),
        ("export.confirm", False),
        ("merge.dtype", "float16"),
        ("demo_model.epochs", 5),
        ("evaluation.kl_tokens", 4),  # a first-token study does not read the answers
        ("evaluation.kl_top_k", 16),
    ):
        assert rs.study_name(_set(config, path, value)) == name, path
    answer = _set(config, "study.objective_kl", "answer")
    assert rs.study_name(answer) != name
    assert rs.study_name(_set(answer, "evaluation.kl_tokens", 4)) != rs.study_name(answer)
    assert rs.study_name(_set(answer, "evaluation.kl_top_k", 16)) != rs.study_name(answer)
    for path, value in (
        ("study.n_ei_candidates", 8),
        ("study.n_startup_trials", 1),
        ("study.stop_dominated", False),
        ("directions.orthogonalize", True),
        ("evaluation.max_new_tokens", 9),
        ("seed", 1),
        ("study.space.direction_scope", ["per_layer"]),
        ("model.system_prompt", "Be brief."),
        ("study.refusal_constraint", 0.1),  # unset (null) it leaves the name as it was before the key
    ):
        assert rs.study_name(_set(config, path, value)) != name, path


def test_the_demo_model_is_rebuilt_only_for_what_its_build_reads():
    demo = _validated(yaml.safe_load((wr.REPO / "config.yaml").read_text()))
    built = rs.fingerprint(demo, "demo_model")
    for path, value in (
        ("model.system_prompt", "Be brief."),
        ("model.quantization", "bnb_4bit"),
        ("study.n_ei_candidates", 8),
        ("directions.orthogonalize", True),
    ):
        assert rs.fingerprint(_set(demo, path, value), "demo_model") == built, path
    for path, value in (
        ("demo_model.epochs", 3),
        ("evaluation.markers", ["i can't"]),
        ("prompts.harmful.splits.demo", 0.3),
        ("seed", 1),
    ):
        assert rs.fingerprint(_set(demo, path, value), "demo_model") != built, path
    # and the demo run's study follows its model
    assert rs.study_name(_set(demo, "demo_model.epochs", 3)) != rs.study_name(demo)


def test_a_chat_template_file_counts_by_its_text(tmp_path, tiny_model_path):
    file = tmp_path / "chat.jinja"
    file.write_text(CHATML)
    config = _set(_validated(wr.tiny_config(tiny_model_path)), "model.chat_template", str(file))
    before = rs.fingerprint(config, "baseline")
    file.write_text(CHATML + "\n")
    assert rs.fingerprint(config, "baseline") != before


# --------------------------------------------------------------------------- on a finished run


def _planned(work: Path, config: dict) -> set[str]:
    changed = work / f"changed-{abs(hash(yaml.safe_dump(config)))}.yaml"
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = wr.snakemake_cmd(work, "-n", "--nolock", "--resources", "gpu=1")
    cmd[cmd.index("--configfile") + 1] = str(changed)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=wr.env(), check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed.unlink()
    return set(re.findall(r"^(?:local)?rule (\w+):", proc.stdout + proc.stderr, re.MULTILINE)) - {
        "all"
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("finished")
    model = tiny_model_dir(tmp_path_factory.mktemp("rs-model") / "model")
    config = wr.tiny_config(model)
    wr.write_config(work, config)
    wr.run(work, "--resources", "gpu=1")
    return work, config


@pytest.mark.slow
def test_each_key_plans_exactly_its_readers_and_what_follows(finished_run):
    work, config = finished_run
    assert _planned(work, config) == set()  # a finished run is up to date
    cases = {
        path: _set(config, path, value(work) if callable(value) else value)
        for path, (value, _) in CHANGES.items()
    }
    with ThreadPoolExecutor(2) as pool:
        planned = dict(zip(cases, pool.map(lambda c: _planned(work, c), cases.values())))
    wrong = {}
    for path, (_, readers) in CHANGES.items():
        expected = _closure(readers) - ({"merge"} if path == "merge.adapter_only" else set())
        if planned[path] != expected:
            wrong[path] = {"planned": sorted(planned[path]), "expected": sorted(expected)}
    assert not wrong, wrong
