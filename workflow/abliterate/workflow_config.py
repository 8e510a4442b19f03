"""Checks and derived values of the workflow configuration (after schema validation).

The schema catches types, unknown keys and ranges; this module catches what a schema cannot say
(values that contradict each other) and derives the paths the rules share. What each rule reads,
and the hashes that name studies: :mod:`abliterate.rule_settings`.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import chat_template_check, study_storage
from .errors import ConfigError, ModelLoadError
from .model_source import ModelSource, resolve
from .packages import package_file
from .study_ledger import LEDGER_NAME

DEMO_PATH = "results/models/demo"
def coerce_cli_strings(config: dict, schema: dict) -> dict:
    """Turn strings into the numbers/booleans/nulls the schema expects, in place.

    ``snakemake --config study='{n_trials: 60}'`` parses nested values with YAML's BaseLoader, which
    keeps every scalar a string ('60'); without this, the documented override would fail validation.
    Only strings at places where the schema does not accept a string are converted.
    """
    import yaml

    def types_of(node: dict) -> set:
        node = _resolve(node, schema)
        t = node.get("type")
        found = set(t if isinstance(t, list) else [t] if t else [])
        for alt in node.get("oneOf", []) + node.get("anyOf", []):
            found |= types_of(alt)
        return found

    def walk(value, node):
        node = _resolve(node, schema)
        if isinstance(value, dict):
            props = node.get("properties", {})
            for key, sub in value.items():
                if key in props:
                    value[key] = walk(sub, props[key])
            return value
        if isinstance(value, list) and "items" in node:
            return [walk(v, node["items"]) for v in value]
        if isinstance(value, str) and "string" not in types_of(node):
            parsed = yaml.safe_load(value)
            return value if isinstance(parsed, (dict, list, str)) else parsed
        return value

    walk(config, schema)
    return config


def _resolve(node: dict, schema: dict) -> dict:
    ref = node.get("$ref")
    if ref and ref.startswith("#/"):
        target = schema
        for part in ref[2:].split("/"):
            target = target[part]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, schema)
    return node


def check(config: dict) -> None:
    """Raise ConfigError naming the key for values the schema cannot rule out."""
    for name, spec in config["prompts"].items():
        fractions = spec.get("splits", {})
        total = sum(fractions.values())
        if total > 1 + 1e-9:
            raise ConfigError(f"prompts.{name}.splits add up to {total:.3f}; they must add up to at most 1")
        for split in ("train", "eval", "heldout"):
            if fractions.get(split, 0) <= 0:
                raise ConfigError(f"prompts.{name}.splits.{split} must be > 0 (the pipeline needs a {split} split)")
        source = spec["source"]
        needed = {"package": ["package", "path"], "file": ["path"], "url": ["path"], "hub": ["dataset"]}[source]
        for key in needed:
            if not spec.get(key):
                raise ConfigError(f"prompts.{name}.{key} is required for source: {source}")
    if uses_demo_model(config) and config["prompts"]["harmful"]["splits"].get("demo", 0) <= 0:
        raise ConfigError("model.path is the demo model, so prompts.harmful.splits.demo must be > 0 (its training prompts)")
    evaluation = config["evaluation"]
    if evaluation["kl_tokens"] > evaluation["max_new_tokens"]:
        raise ConfigError(f"evaluation.kl_tokens ({evaluation['kl_tokens']}) exceeds evaluation.max_new_tokens "
                          f"({evaluation['max_new_tokens']}): the answer KL reads no further into an answer than "
                          "the evaluation generates; lower kl_tokens or raise max_new_tokens")
    study = config["study"]
    if study["n_startup_trials"] > study["n_trials"]:
        raise ConfigError(
            f"study.n_startup_trials ({study['n_startup_trials']}) exceeds study.n_trials ({study['n_trials']})"
        )
    _check_directions(config)
    for key, value in study["space"].items():
        if key == "direction_scope":  # a list of names, not a range
            continue
        low, high = value
        if low > high:
            raise ConfigError(f"study.space.{key}: low {low} > high {high}")
    for key in ("direction_index", "max_weight_position", "min_weight", "min_weight_distance"):
        low, high = study["space"][key]
        if low < 0 or high > 1:
            raise ConfigError(f"study.space.{key} is relative: both ends must lie in [0, 1], got [{low}, {high}]")
    if study["space"]["min_weight_distance"][0] <= 0:
        raise ConfigError("study.space.min_weight_distance must start above 0")
    _check_run_name(config["run"])
    _check_storage(config["study"].get("storage"))
    model = config["model"]
    template = chat_template(model.get("chat_template"))
    if template is not None:
        chat_template_check.check(template, model.get("system_prompt"))
    if not uses_demo_model(config):  # the demo model does not exist before its rule builds it
        resolve(ModelSource.from_config(model))
    _check_packaged_files(config)
    _check_prompt_files(config)
    _check_gguf_export(config)
    evaluation = config["evaluation"]
    if evaluation["heldout_max_new_tokens"] < evaluation["max_new_tokens"]:
        raise ConfigError(f"evaluation.heldout_max_new_tokens ({evaluation['heldout_max_new_tokens']}) is below "
                          f"evaluation.max_new_tokens ({evaluation['max_new_tokens']}): held-out answers must "
                          "run at least the study's budget, whose verdict they also report")
    if config["evaluation"].get("judge") is not None:
        _check_judge(config["evaluation"]["judge"])


JUDGE = "evaluation.judge"


def judge_keys(message: str) -> str:
    """A model loader's message with its ``model.*`` keys named as the judge's."""
    message = re.sub(r"(?<![\w.])model\.chat_template", f"{JUDGE}.chat_template", message)
    return re.sub(r"(?<![\w.])model\.", f"{JUDGE}.model.", message)


def _check_judge(judge: dict) -> None:
    """The judge's model exists (file, folder, package, cached hub id) and its template parses. Its
    yes/no spellings need its tokenizer, so they are checked when evaluate loads it."""
    try:
        resolve(ModelSource.from_config(judge["model"]))
    except ModelLoadError as exc:
        raise ConfigError(f"{JUDGE}.model: {judge_keys(str(exc))}") from exc
    try:
        judge_template(judge)
    except ConfigError as exc:
        raise ConfigError(judge_keys(str(exc))) from exc


def judge_template(judge) -> str | None:
    """``evaluation.judge.chat_template`` as template text (see :func:`chat_template`)."""
    return chat_template(judge["chat_template"])


def _check_directions(config: dict) -> None:
    """study.space.n_directions: integer bounds >= 1, no more than the directions rule computes."""
    bounds = config["study"]["space"]["n_directions"]
    if any(isinstance(b, bool) or not isinstance(b, int | float) or not float(b).is_integer() or b < 1
           for b in bounds):
        raise ConfigError(f"study.space.n_directions: bounds must be integers >= 1, got {list(bounds)}")
    available = config["directions"]["n_directions"]
    if bounds[1] > available:
        raise ConfigError(
            f"study.space.n_directions asks for up to {bounds[1]} directions per layer (k larger than the number of "
            f"available directions): directions.n_directions is {available}; raise it to at least {bounds[1]} "
            "or lower study.space.n_directions"
        )
    low, high = config["study"]["space"]["secondary_weight"]
    if low < 0 or high > 1:
        raise ConfigError(f"study.space.secondary_weight is a fraction of the kernel's weight: both ends must lie "
                          f"in [0, 1], got [{low}, {high}]")


def _check_run_name(run: str) -> None:
    """``run`` names one folder under results/: never a parent, the results folder itself, or a
    hidden name (hidden names beside outputs are the atomic writers' temporaries)."""
    if run.startswith("."):  # the schema's pattern rules out separators
        raise ConfigError(f"run: {run!r} must be a plain folder name (letters, digits, '_', '-', '.', not "
                          "starting with '.'): the run's outputs go to results/<run>/")


def _check_storage(url: str | None) -> None:
    """``study.storage`` parses as a database URL whose driver is installed, and a database server
    answers (``study_storage.check_reachable``): a wrong password fails here, before any GPU job."""
    if url is None:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"study.storage: {url!r} is not a database URL ({exc}); use e.g. "
                          "sqlite:///results/<run>/study.sqlite or postgresql+psycopg://user:password@host/db, "
                          "or null for the default SQLite file") from exc
    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError as exc:
        raise ConfigError(f"study.storage: {shown!r} names the unknown database {parsed.drivername!r}; "
                          "use sqlite, postgresql or mysql") from exc
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise ConfigError(f"study.storage: the driver of {shown!r} is not installed ({exc}); install it "
                          f"(for PostgreSQL: pip install -e '.[postgres]' and a postgresql+psycopg:// URL) or use "
                          "another URL") from exc
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"study.storage: {shown!r} is an in-memory database, which every job would start "
                          "empty; name a file (sqlite:///path/study.sqlite)")
    study_storage.check_reachable(url)


def _check_gguf_export(config: dict) -> None:
    """``merge.gguf``: a type the gguf package writes, a merged model to write, and a GGUF source whose
    tensors its reader can read (the copy keeps them as they are)."""
    if config["merge"].get("gguf") is None:
        return
    from . import gguf_export, gguf_patch

    gguf_export.check_config(config)
    source = None if uses_demo_model(config) else gguf_path(config)
    if source is not None:
        gguf_patch.read(Path(source))


def _check_prompt_files(config: dict) -> None:
    """Local prompt files (a file or a package's) parse into prompts, before the prompts rule runs."""
    from . import prompts

    for name, spec in config["prompts"].items():
        if spec["source"] in ("file", "package"):
            raw, _ = prompts.read_source(spec, name)
            prompts.clean(raw, spec.get("column", "text"), spec.get("group"), name)


def chat_template(value: str | None) -> str | None:
    """``model.chat_template`` as template text: the Jinja template itself, or a file holding it.

    A value without Jinja markup is taken as a path, so a mistyped file name fails here, before any
    job, instead of rendering every prompt as the file name.
    """
    if value is None or "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"model.chat_template: {value!r} is neither a Jinja template (no {{{{ or {{% in it) "
                          "nor an existing file")
    text = path.read_text(encoding="utf-8")
    if "{{" not in text and "{%" not in text:
        raise ConfigError(f"model.chat_template: {value} holds no Jinja template (no {{{{ or {{% in it)")
    return text


def _check_packaged_files(config: dict) -> None:
    """Files named inside installed packages exist, so a missing package stops the run before any job."""
    named = [(f"prompts.{name}", spec["package"], spec["path"])
             for name, spec in config["prompts"].items() if spec["source"] == "package"]
    if uses_demo_model(config):
        demo = config["demo_model"]
        named.append(("demo_model", demo["package"], demo["gguf_file"]))
    for section, package, path in named:
        package_file(package, path, section, ConfigError)


def uses_demo_model(config: dict) -> bool:
    return Path(config["model"]["path"]).as_posix().rstrip("/") == DEMO_PATH


def converted_model_dir(config: dict) -> str | None:
    """Where the gguf_model rule writes a GGUF model as safetensors; None for other models."""
    if uses_demo_model(config) or gguf_path(config) is None:
        return None
    return f"results/{config['run']}/base_model"


def gguf_path(config: dict) -> str | None:
    """The configured GGUF file, as the jobs will load it; None for other models. It is the
    gguf_model rule's input, so a replaced file converts again."""
    return resolve(ModelSource.from_config(config["model"])).gguf_path


def study_db_path(config: dict) -> str | None:
    """The SQLite file of the study when the storage is the default (else None)."""
    if config["study"].get("storage"):
        url = config["study"]["storage"]
        return url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    return f"results/{config['run']}/study.sqlite"


def ledger_path(config: dict) -> str:
    """The study's ledger (``abliterate.study_ledger``): what the database held, recorded beside it."""
    return f"results/{config['run']}/{LEDGER_NAME}"


def storage_url(config: dict) -> str:
    return config["study"].get("storage") or f"sqlite:///results/{config['run']}/study.sqlite"
