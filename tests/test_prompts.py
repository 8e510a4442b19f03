"""Prompt sets: sources, cleaning, seeded stratified disjoint splits, actionable errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from abliterate import prompts
from abliterate.errors import PromptError

SPLITS = {"train": 0.4, "eval": 0.2, "heldout": 0.2, "demo": 0.0}


def _spec(path, **kw):
    return {"source": "file", "path": str(path), "column": "text", "group": None, "splits": SPLITS, "max": {}, **kw}


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "txt", "parquet"])
def test_every_file_type_reads(tmp_path, suffix):
    texts = [f"prompt number {i}" for i in range(20)]
    path = tmp_path / f"p.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps([{"text": t} for t in texts]))
    elif suffix == "jsonl":
        path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    elif suffix == "csv":
        pd.DataFrame({"text": texts}).to_csv(path, index=False)
    elif suffix == "txt":
        path.write_text("\n".join(texts))
    else:
        pd.DataFrame({"text": texts}).to_parquet(path)
    df, source = prompts.fetch(_spec(path), seed=1, name="t")
    assert source == f"file:{path}"
    assert set(df["split"]) == {"train", "eval", "heldout"}
    assert len(df) == 16 and df["prompt"].is_unique


def test_packaged_sets_split_disjoint_and_stratified():
    spec = {"source": "package", "package": "abliterate", "path": "data/harmless_prompts.json", "records": "prompts",
            "column": "prompt", "group": "topic", "splits": {"train": 0.3, "eval": 0.2, "heldout": 0.2, "demo": 0.1},
            "max": {"eval": 40}}
    a, _ = prompts.fetch(spec, seed=7, name="harmless")
    b, _ = prompts.fetch(spec, seed=7, name="harmless")
    pd.testing.assert_frame_equal(a, b)  # seeded: the same split every time
    assert (a["split"] == "eval").sum() == 40  # the cap applies
    assert a["prompt"].is_unique
    # Stratified: every split holds prompts of many topics.
    assert a[a["split"] == "heldout"]["group"].nunique() > 20
    c, _ = prompts.fetch(spec, seed=8, name="harmless")
    assert set(a.loc[a["split"] == "eval", "prompt"]) != set(c.loc[c["split"] == "eval", "prompt"])


def test_duplicates_are_removed_before_splitting(tmp_path):
    path = tmp_path / "dups.txt"
    path.write_text("\n".join([f"p{i}" for i in range(10)] * 3))
    df, _ = prompts.fetch(_spec(path), seed=0, name="d")
    assert df["prompt"].is_unique and len(df) == 8


@pytest.mark.parametrize(
    "content, spec_extra, message",
    [
        ("", {}, r"is empty"),
        ("same\nsame\nsame\n", {}, r"1 distinct prompt"),
        ("a\nb\nc\n", {"column": "prompt"}, r"no column 'prompt'"),
        ("\n".join(f"p{i}" for i in range(4)), {"splits": {"train": 0.5, "eval": 0.1, "heldout": 0.1}},
         r"too few for a eval split"),
        ("\n".join(f"p{i}" for i in range(40)), {"splits": {"train": 0.6, "eval": 0.3, "heldout": 0.3}},
         r"add up to 1\.200"),
    ],
)
def test_bad_prompt_sets_fail_with_a_clear_message(tmp_path, content, spec_extra, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(PromptError, match=message):
        prompts.fetch(_spec(path, **spec_extra), seed=0, name="bad")


def test_missing_file_and_package():
    with pytest.raises(PromptError, match="does not exist"):
        prompts.read_source({"source": "file", "path": "/no/such/file.json"})
    with pytest.raises(Exception, match="not installed"):
        prompts.read_source({"source": "package", "package": "no_such_pkg_abl", "path": "x.json"})


def test_overlap_between_sets_is_refused():
    a = pd.DataFrame({"prompt": ["x", "y"], "group": "g", "split": "train"})
    b = pd.DataFrame({"prompt": ["y", "z"], "group": "g", "split": "eval"})
    with pytest.raises(PromptError, match="share 1 prompts"):
        prompts.check_no_cross_overlap({"harmful": a, "harmless": b})
