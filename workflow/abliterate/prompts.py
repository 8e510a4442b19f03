"""Prompt sets: fetch from a package, the hub, a URL or a file; clean; split into disjoint parts.

A set is one table with columns ``prompt``, ``group`` and ``split``. The split is seeded and
stratified by ``group`` (so every topic reaches every split) and no prompt text appears twice:
duplicates are removed before splitting, which is what makes the splits disjoint by construction.
"""

from __future__ import annotations

import io as _io
import json
import logging
import random
import urllib.request
from collections import defaultdict
from pathlib import Path

import pandas as pd

from .errors import PromptError
from .packages import package_file

log = logging.getLogger(__name__)

SPLITS = ("demo", "train", "eval", "heldout")


def _records_from_bytes(data: bytes, name: str, records_key: str | None, key: str = "path") -> pd.DataFrame:
    """The file's records as a table; a file that does not parse raises PromptError naming it and ``key``."""
    if not data.strip():
        raise PromptError(f"prompt file {name} ({key}) is empty")
    try:
        return _parse_records(data, name, records_key)
    except PromptError:
        raise
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError) as exc:
        # JSONDecodeError is a ValueError; pyarrow's ArrowInvalid too
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise PromptError(f"prompt file {name} ({key}) does not parse as "
                          f"{name.lower().rsplit('.', 1)[-1]}: {type(exc).__name__}: {first}") from exc


def _parse_records(data: bytes, name: str, records_key: str | None) -> pd.DataFrame:
    suffix = name.lower().rsplit(".", 1)[-1] if "." in name else ""
    if suffix == "parquet":
        return pd.read_parquet(_io.BytesIO(data))
    if suffix == "csv":
        return pd.read_csv(_io.BytesIO(data))
    if suffix == "jsonl":
        return pd.DataFrame([json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()])
    if suffix == "txt":
        return pd.DataFrame({"text": [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]})
    if suffix == "json":
        obj = json.loads(data.decode("utf-8"))
        if isinstance(obj, dict):
            if not records_key:
                raise PromptError(f"{name} holds a JSON object with keys {sorted(obj)}; set `records` to the list's key")
            if records_key not in obj:
                raise PromptError(f"{name} has no key {records_key!r} (records); keys: {sorted(obj)}")
            obj = obj[records_key]
        if not isinstance(obj, list):
            raise PromptError(f"{name}: expected a list of records")
        if obj and isinstance(obj[0], str):
            return pd.DataFrame({"text": obj})
        return pd.DataFrame(obj)
    raise PromptError(f"{name}: unknown prompt file type {suffix!r}; use json, jsonl, csv, txt or parquet")


def read_source(spec: dict, name: str | None = None) -> tuple[pd.DataFrame, str]:
    """Read a configured prompt source into a raw table; return it with a description of the source.
    ``name`` (the set's key under ``prompts``) makes errors name the config key."""
    source = spec["source"]
    key = f"prompts.{name}.path" if name else "path"
    if source == "package":
        if not spec.get("package") or not spec.get("path"):
            raise PromptError("a package prompt source needs both `package` and `path`")
        file = package_file(spec["package"], spec["path"], "prompts", PromptError)
        return (_records_from_bytes(file.read_bytes(), str(file), spec.get("records"), key),
                f"package:{spec['package']}/{spec['path']}")
    if source == "file":
        file = Path(spec.get("path") or "")
        if not file.is_file():
            raise PromptError(f"prompt file {str(file)!r} ({key}) does not exist")
        return _records_from_bytes(file.read_bytes(), str(file), spec.get("records"), key), f"file:{file}"
    if source == "url":
        url = spec.get("path") or ""
        if not url.startswith(("http://", "https://")):
            raise PromptError(f"a url prompt source needs an http(s) URL in `path`, got {url!r}")
        with urllib.request.urlopen(url, timeout=60) as resp:  # the URL comes from the user's config
            data = resp.read()
        return _records_from_bytes(data, url.split("?")[0], spec.get("records"), key), f"url:{url}"
    if source == "hub":
        try:
            import datasets
        except ImportError as exc:
            raise PromptError("a hub prompt source needs the `datasets` package: pip install datasets") from exc
        if not spec.get("dataset"):
            raise PromptError("a hub prompt source needs `dataset`")
        ds = datasets.load_dataset(spec["dataset"], spec.get("config"), split=spec.get("split", "train"))
        return ds.to_pandas(), f"hub:{spec['dataset']}:{spec.get('config') or ''}:{spec.get('split', 'train')}"
    raise PromptError(f"unknown prompt source {source!r}; use package, hub, url or file")


def clean(raw: pd.DataFrame, column: str, group: str | None, name: str) -> pd.DataFrame:
    """Keep the prompt (and group) columns, strip text, drop empty rows and duplicates."""
    if column not in raw.columns:
        raise PromptError(f"prompt set {name!r}: no column {column!r} (column); columns: {list(raw.columns)}")
    if group and group not in raw.columns:
        raise PromptError(f"prompt set {name!r}: no column {group!r} (group); columns: {list(raw.columns)}")
    df = pd.DataFrame({
        "prompt": raw[column].astype("string").str.strip(),
        "group": raw[group].astype("string") if group else "all",
    })
    df = df[df["prompt"].notna() & (df["prompt"].str.len() > 0)]
    if df.empty:
        raise PromptError(f"prompt set {name!r} is empty after removing blank prompts")
    before = len(df)
    df = df.drop_duplicates("prompt").reset_index(drop=True)
    if len(df) < before:
        log.info("prompt set %s: dropped %d duplicate prompts", name, before - len(df))
    if len(df) < 2:
        raise PromptError(f"prompt set {name!r} has {len(df)} distinct prompt(s) ({before} before removing duplicates)")
    return df


def split(df: pd.DataFrame, fractions: dict[str, float], caps: dict[str, int], seed: int, name: str) -> pd.DataFrame:
    """Assign each prompt to at most one split, stratified by group, seeded; unassigned rows are dropped."""
    total = sum(fractions.get(s, 0.0) for s in SPLITS)
    if total > 1 + 1e-9:
        raise PromptError(f"prompt set {name!r}: split fractions add up to {total:.3f} > 1 (prompts.{name}.splits)")
    n = len(df)
    wanted = {s: min(round(fractions.get(s, 0.0) * n), caps.get(s, n)) for s in SPLITS}
    for s in ("train", "eval", "heldout"):
        if fractions.get(s, 0.0) > 0 and wanted[s] < 1:
            raise PromptError(
                f"prompt set {name!r} has {n} prompts: too few for a {s} split of {fractions[s]} "
                f"(prompts.{name}.splits.{s}); add prompts or raise the fraction"
            )
    rng = random.Random(seed)
    by_group: dict[str, list[int]] = defaultdict(list)
    for idx, g in enumerate(df["group"].tolist()):
        by_group[str(g)].append(idx)
    # Interleave groups in a shuffled round robin, then deal splits out in order: each split gets a
    # near-equal share of every group without any per-group rounding trouble.
    queues = []
    for g in sorted(by_group):
        members = by_group[g][:]
        rng.shuffle(members)
        queues.append(members)
    order: list[int] = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop())
    labels = [None] * n
    # Deal round-robin over splits, weighted by how many each still needs.
    remaining = dict(wanted)
    pos = 0
    while pos < n and any(remaining.values()):
        for s in SPLITS:
            if remaining[s] > 0 and pos < n:
                labels[order[pos]] = s
                remaining[s] -= 1
                pos += 1
    out = df.assign(split=labels)
    out = out[out["split"].notna()].reset_index(drop=True)
    counts = out["split"].value_counts().to_dict()
    log.info("prompt set %s: %d prompts -> %s", name, n, ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS))
    return out


def check_no_cross_overlap(sets: dict[str, pd.DataFrame]) -> None:
    """A prompt must not be both harmful and harmless."""
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = set(sets[a]["prompt"]) & set(sets[b]["prompt"])
            if common:
                raise PromptError(f"prompt sets {a!r} and {b!r} share {len(common)} prompts, e.g. {next(iter(common))[:80]!r}")


def fetch(spec: dict, seed: int, name: str) -> tuple[pd.DataFrame, str]:
    raw, description = read_source(spec, name)
    df = clean(raw, spec.get("column", "text"), spec.get("group"), name)
    return split(df, spec.get("splits", {}), spec.get("max", {}), seed, name), description

