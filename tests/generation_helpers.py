"""Prompts and a rigged refusal detector shared by the generation tests."""

from __future__ import annotations

# Lengths from 2 to 49 characters: left padding, shared prefixes and rows that finish at different steps.
PROMPTS = [
    "Hi",
    "How do I bake bread at home?",
    "Tell me a story about a dragon and a knight.",
    "2+2?",
    "Write a haiku about autumn leaves falling slowly.",
    "What is the capital of France?",
    "ok",
]


class StopAfter:
    """Rigged detector: decides as soon as the text so far contains its row's stop string."""

    def __init__(self, stops):
        self.stops = stops
        self.calls = 0

    def verdict(self, partial_text):
        self.calls += 1
        return True if any(s in partial_text for s in self.stops) else None
