"""Held-out answers generated whole, and the marker verdicts read off them.

The study stops each answer at its first refusal marker and at ``evaluation.max_new_tokens``; a
held-out answer runs to ``evaluation.heldout_max_new_tokens`` (or EOS) instead, without the early
stop. Its first ``max_new_tokens`` tokens give the verdict the study would have given (greedy
decoding makes them the same tokens); a marker that appears only after them is a *late refusal*: the
model started to answer and refused further on, which the study's budget cannot see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from .evaluation import EvalSettings
from .generation import generate_ids


@dataclass(frozen=True)
class HeldoutAnswers:
    responses: list[str]  # whole answers, up to the long budget
    refused: list[bool]  # a marker within the study's budget
    late: list[bool]  # a marker only after it
    max_new_tokens: int
    heldout_max_new_tokens: int

    @property
    def refused_anywhere(self) -> list[bool]:
        """The marker verdict on the whole answer (what the judge is compared with)."""
        return [a or b for a, b in zip(self.refused, self.late)]

    def counts(self) -> dict:
        """``refusals`` and ``n`` as every summary has them, plus the late refusals and both budgets."""
        return {"refusals": int(sum(self.refused)), "n": len(self.refused), "late_refusals": int(sum(self.late)),
                "max_new_tokens": self.max_new_tokens, "heldout_max_new_tokens": self.heldout_max_new_tokens}

    def table(self, prompts: list[str], label: str) -> pd.DataFrame:
        return pd.DataFrame({"set": label, "prompt": prompts, "response": self.responses, "refusal": self.refused,
                             "late_refusal": self.late})


def answer(model, tokenizer, settings: EvalSettings, texts: Sequence[str], heldout_max_new_tokens: int,
           batch_size: int, progress: bool = False) -> HeldoutAnswers:
    """Greedy answers to chat-formatted ``texts``, not stopped at a marker, and their verdicts by
    ``settings.detector`` at ``settings.max_new_tokens`` and after it; ``batch_size`` is sized for
    the long budget."""
    ids = generate_ids(model, tokenizer, texts, heldout_max_new_tokens, batch_size, detector=None,
                       progress=progress, cuda_graphs=settings.cuda_graphs)
    short = tokenizer.batch_decode([i[: settings.max_new_tokens] for i in ids], skip_special_tokens=True)
    whole = tokenizer.batch_decode(ids, skip_special_tokens=True)
    refused = [settings.detector.is_refusal(t) for t in short]
    late = [not r and settings.detector.is_refusal(w) for r, w in zip(refused, whole)]
    return HeldoutAnswers(whole, refused, late, settings.max_new_tokens, heldout_max_new_tokens)


def with_late_column(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """The tables as one; rows of splits generated the study's way have no late verdict (NA)."""
    out = pd.concat(tables, ignore_index=True)
    if "late_refusal" in out:
        out["late_refusal"] = out["late_refusal"].astype("boolean")
    return out
