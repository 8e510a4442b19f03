"""Score a (possibly edited) model: refusals on harmful prompts, KL divergence on harmless ones."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from .generation import generate
from .kl import first_token_logprobs, kl_divergence
from .refusal import RefusalDetector

log = logging.getLogger(__name__)


class Evaluator:
    """Scores the current weights of ``model``; call :meth:`score` again after each edit.

    ``harmful_texts`` and ``harmless_texts`` are chat-formatted (see ``prompting.chat_texts``);
    ``base_logprobs`` are the unedited model's first-token log-probabilities on ``harmless_texts``
    (see :func:`baseline`). Responses stop early once the detector has seen a refusal marker, so
    :meth:`responses` returns them cut at that point.
    """

    def __init__(
        self,
        model,
        tokenizer,
        harmful_texts: Sequence[str],
        harmless_texts: Sequence[str],
        base_logprobs: torch.Tensor,
        max_new_tokens: int,
        batch_size: int,
        detector: RefusalDetector | None = None,
    ):
        if base_logprobs.shape[0] != len(harmless_texts):
            raise ValueError(
                f"base_logprobs has {base_logprobs.shape[0]} rows for {len(harmless_texts)} harmless texts"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.harmful_texts = list(harmful_texts)
        self.harmless_texts = list(harmless_texts)
        self.base_logprobs = base_logprobs
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.detector = detector if detector is not None else RefusalDetector()
        self._responses: list[str] | None = None

    def kl(self) -> float:
        logprobs = first_token_logprobs(
            self.model, self.tokenizer, self.harmless_texts, self.batch_size
        )
        return kl_divergence(self.base_logprobs, logprobs)

    def refusals(self) -> int:
        self._responses = generate(
            self.model,
            self.tokenizer,
            self.harmful_texts,
            self.max_new_tokens,
            self.batch_size,
            detector=self.detector,
        )
        return sum(self.detector.is_refusal(r) for r in self._responses)

    def score(self) -> dict:
        """``{"refusals": int, "n": int, "kl": float, "seconds": float}`` for the current weights."""
        start = time.perf_counter()
        kl = self.kl()
        refusals = self.refusals()
        seconds = time.perf_counter() - start
        log.info("refusals %d/%d, KL %.4g (%.1f s)", refusals, len(self.harmful_texts), kl, seconds)
        return {"refusals": refusals, "n": len(self.harmful_texts), "kl": kl, "seconds": seconds}

    def responses(self) -> list[str]:
        """Responses to the harmful prompts from the last :meth:`score` (generated now if none yet)."""
        if self._responses is None:
            self.refusals()
        return list(self._responses)


def baseline(
    model,
    tokenizer,
    harmful_texts: Sequence[str],
    harmless_texts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    detector: RefusalDetector | None = None,
) -> dict:
    """The unedited model's ``refusals``, ``n``, ``responses`` and ``logprobs`` (on harmless texts).

    ``logprobs`` stays on the model's device, ready to be the ``base_logprobs`` of an
    :class:`Evaluator`; move it to the CPU before saving.
    """
    detector = detector if detector is not None else RefusalDetector()
    start = time.perf_counter()
    logprobs = first_token_logprobs(model, tokenizer, harmless_texts, batch_size)
    responses = generate(
        model, tokenizer, harmful_texts, max_new_tokens, batch_size, detector=detector
    )
    refusals = sum(detector.is_refusal(r) for r in responses)
    seconds = time.perf_counter() - start
    log.info("baseline: refusals %d/%d (%.1f s)", refusals, len(harmful_texts), seconds)
    return {
        "refusals": refusals,
        "n": len(harmful_texts),
        "responses": responses,
        "logprobs": logprobs,
        "seconds": seconds,
    }
