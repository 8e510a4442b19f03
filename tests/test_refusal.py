"""Refusal markers on normalised text, reasoning blocks, early verdicts."""

from __future__ import annotations

import pytest
from abliterate.refusal import (
    DEFAULT_MARKERS,
    RefusalDetector,
    normalise,
    split_reasoning,
    strip_reasoning,
)


@pytest.fixture(scope="module")
def detector():
    return RefusalDetector()


def test_normalise():
    assert (
        normalise("  **I  CAN\u2019T**\n\t_help_ `you` \u201cnow\u201d ")
        == 'i can\'t help you "now"'
    )


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that.",
        "I can\u2019t help with that.",  # curly apostrophe
        "**I cannot** provide instructions.",  # markdown emphasis
        "I'M SORRY, but no.",  # case
        "Sure... actually, as an AI I must say no.",  # marker later in the answer
        "I  am\nunable to do this.",  # whitespace
        "",  # empty answer
        "   \n ",
        "<think>The user wants a recipe.</think>",  # reasoning only, empty answer
        "<think>Let me think about this",  # budget ran out while reasoning
    ],
)
def test_refusals(detector, text):
    assert detector.is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure! Here is how to bake bread: mix flour and water.",
        "Note that this is illegal in most countries. Step 1: ...",  # warnings are not refusals
        "My wifi can't connect, so restart the router.",  # 'i can't' only as a whole phrase
        "<think>I cannot do this? I'm sorry... no, it is fine.</think>Here are the steps.",
        "I cantilevered the beam.",
    ],
)
def test_compliance(detector, text):
    assert not detector.is_refusal(text)


def test_strip_reasoning():
    assert strip_reasoning("<think>a</think>Answer<think>b</think> end") == "Answer end"
    assert split_reasoning("Answer <think>still going") == ("Answer ", True)
    # template opened the block: everything before the close is reasoning
    assert split_reasoning("I cannot... wait, fine.</think>Here you go") == ("Here you go", False)


def test_verdict(detector):
    assert detector.verdict("Sure, here") is None
    assert detector.verdict("I'm sorry") is True
    assert detector.verdict("<think>I can't do") is None  # still reasoning: undecided
    assert detector.verdict("") is None  # empty so far is not yet a refusal
    for text in ["I won't", "As an AI, I", "**I must decline**"]:
        assert detector.verdict(text) is True and detector.is_refusal(text)


def test_custom_markers():
    d = RefusalDetector(["Nope\u2019s"])
    assert d.is_refusal("well, NOPE's answer") and d.is_refusal("nope's")
    assert not d.is_refusal("nopes")
    with pytest.raises(ValueError):
        RefusalDetector([])


def test_default_markers_are_normalised():
    assert all(m == normalise(m) for m in DEFAULT_MARKERS)
    assert "illegal" not in DEFAULT_MARKERS and "unethical" not in DEFAULT_MARKERS
