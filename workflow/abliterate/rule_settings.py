"""What each rule reads from the configuration, as frozen typed settings, and the hashes that name
what the rules make.

A rule gets the slice of the validated configuration its step reads (:data:`READS`) as
``params.settings``, and its step turns it into frozen dataclasses with :func:`typed` (fields: the
keys it reads, typed as the schema types them), which fails on a missing or an extra key.
Snakemake reruns a job whose params changed, so a changed key reruns the rules that read it and,
through their outputs, those downstream. The classes are also read-only mappings, so helpers shared
with the Snakefile's whole configuration accept them.

What outlives a job (a study in its database, the prompt tables that runs share) is named by a
:func:`fingerprint`: a hash of the rule's slice, less the keys that decide how fast or where it runs
rather than what it makes (:data:`NOT_HASHED`), and of the fingerprints of the rules it reads from
(:func:`upstream`). So raising ``study.n_trials`` or switching ``ablation.route`` continues the same
study, and a new ``study.n_ei_candidates`` starts another.

Read when Snakemake parses the workflow: no torch or optuna here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .io import config_hash
from .workflow_config import chat_template, gguf_path, uses_demo_model

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


# model.* keys as the open_model path reads them (run: where a converted GGUF model lives)
_SOURCE = ("model.path", "model.revision", "model.gguf_file", "model.package", "model.trust_remote_code")
_MODEL = ("run", *_SOURCE, "model.chat_template", "model.system_prompt", "model.dtypes", "model.cpu_half",
          "model.device_map", "model.quantization")
_EVALUATION = ("evaluation",)
_ABLATION = ("seed", "ablation")
# the study's refusal verdict, which picks the harmful prompts directions.refused_only keeps
_VERDICT = ("evaluation.max_new_tokens", "evaluation.batch_size", "evaluation.cuda_graphs", "evaluation.markers")

READS: dict[str, tuple[str, ...]] = {
    "prompts": ("seed", "prompts"),
    # the harmful set's own refusals are the demo model's training targets
    "demo_model": ("demo_model", "prompts.harmful", "evaluation.markers"),
    "gguf_model": (*_SOURCE, "merge.max_ram_gib"),
    "baseline": (*_MODEL, *_EVALUATION),
    "directions": (*_MODEL, "directions", *_VERDICT),
    "study": (*_MODEL, *_EVALUATION, *_ABLATION, "study.n_startup_trials", "study.n_ei_candidates",
              "study.stop_dominated", "study.space", "study.objective_kl", "study.refusal_constraint"),
    "trials": (),
    # the confirmation measures the study's KL
    "export": (*_MODEL, *_EVALUATION, *_ABLATION, "export", "study.objective_kl"),
    "merge": ("run", *_SOURCE, "model.chat_template", "merge.dtype", "merge.max_ram_gib"),
    "evaluate": (*_MODEL, *_EVALUATION, "merge.adapter_only"),
    "gguf_export": ("run", *_SOURCE, "merge.gguf"),
    # the cards: the source's licence and Hub id, and the selection rule the export applied
    "release": ("run", *_SOURCE, "seed", "export", "merge.gguf"),
}

# Keys inside a section a rule reads that the rule does not read: the held-out evaluation's own
# settings. The study and the export never generate held-out answers, so a new judge or held-out
# budget leaves the study's name (and its trials) as they are; the baseline generates the base
# model's held-out answers, which evaluate judges.
_HELDOUT = ("evaluation.heldout_max_new_tokens", "evaluation.judge")
SKIPS: dict[str, tuple[str, ...]] = {"baseline": ("evaluation.judge",), "study": _HELDOUT, "export": _HELDOUT}

# Keys a rule reads only while a switch is on. Off, they reach it as None and are left out of its
# hash with the switch itself: a new evaluation budget then neither reruns the directions rule (its
# params do not change) nor renames what follows it, and a run that leaves the switch off keeps the
# names it had before the switch existed.
WHEN_ON: dict[str, tuple[str, tuple[str, ...]]] = {"directions": ("directions.refused_only", _VERDICT)}


class Section(Mapping):
    """Frozen settings that also read as the configuration mapping they were built from, so helpers
    shared with the Snakefile's whole configuration accept them."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "array": tuple, "object": Mapping,
          "null": type(None)}


@functools.cache
def _schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))


def _annotation(path: tuple[str, ...]) -> Any:
    """The schema's type of a key (documentation: the schema validated the value already)."""
    node = _schema()
    for part in path:
        node = node.get("properties", {}).get(part, {})
    kinds = node.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds or []
    return functools.reduce(operator.or_, [_TYPES[k] for k in kinds]) if kinds else Any


@functools.cache
def _section_class(rule: str, path: tuple[str, ...], names: tuple[str, ...]) -> type[Section]:
    title = "".join(part.title().replace("_", "") for part in (rule, *path))
    fields = [(n, _annotation((*path, n))) for n in names]
    return dataclasses.make_dataclass(f"{title}Settings", fields, bases=(Section,), frozen=True)


def _leaves(path: str) -> list[str]:
    """A whole section (``evaluation``) as its keys; anything deeper (a prompt source, the search
    space) is one value."""
    node = _schema()["properties"].get(path, {}) if "." not in path else {}
    return [f"{path}.{key}" for key in node["properties"]] if "properties" in node else [path]


def _tree(rule: str) -> dict:
    """The keys ``rule`` reads, nested; a leaf (None) holds its value as configured."""
    tree: dict = {}
    for path in READS[rule]:
        for leaf in _leaves(path):
            if leaf not in SKIPS.get(rule, ()):
                _put(tree, leaf, None)
    return tree


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _frozen(v) for k, v in value.items()})
    return tuple(_frozen(v) for v in value) if isinstance(value, list | tuple) else value


def _build(rule: str, tree: dict, data: Mapping, path: tuple[str, ...] = ()) -> Section:
    missing, extra = sorted(set(tree) - set(data)), sorted(set(data) - set(tree))
    problems = [f"{missing} missing"] if missing else []
    if extra:
        problems.append(f"{extra} beyond what its step reads")
    if problems:
        where = ".".join(path) or "the top"
        raise ConfigError(f"the settings of rule {rule} at {where}: {'; '.join(problems)} "
                          "(abliterate.rule_settings.READS)")
    cls = _section_class(rule, path, tuple(tree))
    return cls(**{name: _frozen(data[name]) if sub is None else _build(rule, sub, data[name], (*path, name))
                  for name, sub in tree.items()})


def typed(rule: str, settings: Mapping) -> Section:
    """The frozen settings of ``rule`` (its slice, :data:`READS`) from its ``params.settings``, as
    nested dataclasses whose fields are the keys it reads; ``rule``'s own typed settings pass
    through."""
    if type(settings) is _section_class(rule, (), tuple(_tree(rule))):
        return settings
    return _build(rule, _tree(rule), settings)


# Read, but not part of what a rule makes. The study's own budget and place (study.n_trials,
# study.workers, study.storage) reach its jobs as separate params and are never hashed either.
NOT_HASHED: dict[str, str] = {
    "run": "the run's name already names its folder and prefixes the study's name",
    "ablation.route": "in-place and LoRA edits score the same; only the speed differs",
    "evaluation.cuda_graphs": "graph replay decodes the same tokens as eager decoding, faster",
    "merge.max_ram_gib": "a limit checked before loading, not an input of the result",
}

# Read, but part of what the study makes only when it minimises the answer KL: a first-token study
# keeps the name it had before these keys existed (kl_tokens and kl_top_k then decide only evaluate's
# kl_answer). The baseline stores the answers whichever KL the study minimises: its settings param
# reruns it when they change, and its hash leaves them out, so switching the objective does not.
ANSWER_KL_KEYS = ("evaluation.kl_tokens", "evaluation.kl_top_k", "study.objective_kl")


def _not_hashed(config: dict, rule: str) -> list[str]:
    answer = config.get("study", {}).get("objective_kl", "first_token") == "answer" and rule != "baseline"
    # part of the study's name only when set: a study exploring the whole front keeps its name
    unconstrained = config.get("study", {}).get("refusal_constraint") is None
    return [*NOT_HASHED, *(() if answer else ANSWER_KL_KEYS),
            *(("study.refusal_constraint",) if unconstrained else ()), *_switched_off(config, rule)]


def _switched_off(config: dict, rule: str) -> tuple[str, ...]:
    """The switch of ``rule`` (:data:`WHEN_ON`) and the keys it governs, when it is off."""
    if rule not in WHEN_ON:
        return ()
    switch, keys = WHEN_ON[rule]
    *parents, last = switch.split(".")
    section = functools.reduce(lambda node, part: node.get(part, {}), parents, config)
    # a configuration not yet validated lacks the schema's defaults; the switch's is then the one used
    default = functools.reduce(lambda node, part: node["properties"][part], switch.split("."), _schema())["default"]
    return () if section.get(last, default) is True else (switch, *keys)


def model_rule(config: dict) -> str | None:
    """The rule that makes the model the jobs load (the demo model, a converted GGUF), if any."""
    if uses_demo_model(config):
        return "demo_model"
    return "gguf_model" if gguf_path(config) is not None else None


def upstream(config: dict, rule: str) -> tuple[str, ...]:
    """The rules whose outputs ``rule`` reads."""
    model = (model_rule(config),) if model_rule(config) else ()
    evaluated = ("export",) if config["merge"]["adapter_only"] else ("merge",)
    return {
        "prompts": (),
        "demo_model": ("prompts",),
        "gguf_model": (),
        "baseline": ("prompts", *model),
        "directions": ("prompts", *model),
        "study": ("prompts", *model, "directions", "baseline"),
        "trials": ("study",),
        "export": ("prompts", *model, "directions", "trials"),
        "merge": (*model, "export"),
        "evaluate": ("prompts", *model, "baseline", "trials", *evaluated),
        "gguf_export": ("merge",),
        "release": (*model, "export", *(() if config["merge"]["adapter_only"] else ("merge",)), "evaluate",
                    *(("gguf_export",) if config["merge"]["gguf"] else ())),
    }[rule]


def _put(out: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        out = out.setdefault(part, {})
    out[last] = copy.deepcopy(value)


def settings(config: dict, rule: str) -> dict:
    """The slice of ``config`` that ``rule``'s step reads, in the configuration's shape."""
    out: dict = {}
    for path in READS[rule]:
        _put(out, path, functools.reduce(operator.getitem, path.split("."), config))
    for path in SKIPS.get(rule, ()):
        *parents, last = path.split(".")
        functools.reduce(operator.getitem, parents, out).pop(last, None)
    for path in _switched_off(config, rule)[1:]:
        _put(out, path, None)
    return out


def fingerprint(config: dict, rule: str, upstream_of: str | None = None) -> str:
    """Hash of what ``rule`` makes from: its hashed settings and its upstream rules' fingerprints.

    ``upstream_of``: the rule reading ``rule``'s outputs; the held-out keys that reader skips
    (:data:`SKIPS`) are left out, since they change only outputs it does not read (the baseline's
    held-out answers do not rename the study)."""
    hashed = settings(config, rule)
    for path in (*_not_hashed(config, rule), *SKIPS.get(upstream_of, ())):
        *parents, last = path.split(".")
        node = hashed
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    for path in _switched_off(config, rule)[1:]:
        # the section that held only switched-off keys goes too, as if never read
        section = path.split(".")[0]
        if hashed.get(section) == {}:
            del hashed[section]
    template = hashed.get("model", {}).get("chat_template")
    if template is not None and chat_template(template) != template:
        # a template file: its text decides the prompts, so an edited file counts as a new setting
        hashed["model"]["chat_template"] = {"file": template, "text": chat_template(template)}
    ups = {name: fingerprint(config, name, rule) for name in upstream(config, rule)}
    return config_hash({**hashed, **({"upstream": ups} if ups else {})})


def study_name(config: dict) -> str:
    return f"abliterate-{config['run']}-{fingerprint(config, 'study')}"


def prompts_dir(config: dict) -> str:
    """The prompt tables of these prompt settings. Keyed by their fingerprint, not by run: runs with
    the same settings share the tables, and a run with other settings cannot overwrite another run's
    tables (which would rerun that run's whole chain when it is next asked for)."""
    return f"results/prompts/{fingerprint(config, 'prompts')}"
