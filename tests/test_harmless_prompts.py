"""Sanity checks for the project's own harmless prompt set (no torch needed)."""

import json
import re
from pathlib import Path

import pytest

DATA = Path(__file__).parents[1] / "workflow/abliterate/data/harmless_prompts.json"
FORMS = {
    "question", "instruction", "code", "math", "advice",
    "rewrite", "list", "creative", "chat", "explain",
}
MAX_JACCARD = 0.7
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@pytest.fixture(scope="module")
def doc():
    return json.loads(DATA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prompts(doc):
    return doc["prompts"]


def words(text):
    return frozenset(WORD.findall(text.lower()))


def normalise(text):
    return " ".join(WORD.findall(text.lower()))


def test_licence_and_description(doc):
    assert doc["license"] == "CC0-1.0"
    assert doc["description"].strip()
    assert (DATA.parent / "LICENSE-harmless_prompts").is_file()


def test_size_and_fields(prompts):
    assert len(prompts) >= 400
    for p in prompts:
        assert set(p) == {"id", "topic", "form", "prompt"}, p
        assert p["prompt"].strip(), p["id"]
        assert p["form"] in FORMS, p
        assert p["topic"] == p["topic"].strip().lower() and p["topic"], p


def test_unique_ids(prompts):
    ids = [p["id"] for p in prompts]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"h\d{4}", i) for i in ids)


def test_variety(prompts):
    assert len({p["form"] for p in prompts}) >= 8
    assert len({p["topic"] for p in prompts}) >= 25


def test_no_exact_duplicates(prompts):
    seen = {}
    for p in prompts:
        key = normalise(p["prompt"])
        assert key not in seen, (seen.get(key), p["id"])
        seen[key] = p["id"]


def test_no_near_duplicates(prompts):
    # Jaccard(a, b) <= |a| / |b| for |a| <= |b|: with sets sorted by size, each one only
    # needs comparing with the slightly larger ones that could still reach the cut-off.
    sets = sorted(((words(p["prompt"]), p["id"]) for p in prompts), key=lambda s: len(s[0]))
    clashes = []
    for i, (a, ida) in enumerate(sets):
        for b, idb in sets[i + 1 :]:
            if len(a) < MAX_JACCARD * len(b):
                break
            union = len(a | b)
            if union and len(a & b) / union >= MAX_JACCARD:
                clashes.append((ida, idb))
    assert not clashes, clashes
