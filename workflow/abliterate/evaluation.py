"""Score a (possibly edited) model: refusals on harmful prompts, KL divergence on harmless ones."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .answer_kl import BaseAnswers, answer_batches, answer_kl, answer_logprobs
from .architecture import unwrap
from .generation import RefusalLimitReached, first_batch, generate, make_decoder
from .kl import first_token_logprobs, kl_divergence, prompt_batches
from .leading_layers import LeadingLayers
from .refusal import RefusalDetector

log = logging.getLogger(__name__)


class Evaluator:
    """Scores the current weights of ``model``; call :meth:`score` again after each edit.

    ``harmful_texts`` and ``harmless_texts`` are chat-formatted (see ``prompting.chat_texts``);
    ``base_logprobs`` are the unedited model's first-token log-probabilities on ``harmless_texts``
    (see :func:`measure`). Responses stop early once the detector has seen a refusal marker, so
    :meth:`responses` returns them cut at that point. With ``reuse_layers`` the prefills that every
    score repeats are recorded now, while the model is unedited (:mod:`abliterate.leading_layers`).

    ``objective_kl`` (``study.objective_kl``): which KL :meth:`kl` and :meth:`score` report,
    ``first_token`` or ``answer`` (:mod:`abliterate.answer_kl`, which needs ``base_answers``, the
    unedited model's answers to ``harmless_texts``). Only that one is measured per score.
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
        reuse_layers: bool = False,
        cuda_graphs: bool = True,
        base_answers: BaseAnswers | None = None,
        objective_kl: str = "first_token",
    ):
        if base_logprobs.shape[0] != len(harmless_texts):
            raise ValueError(
                f"base_logprobs has {base_logprobs.shape[0]} rows for {len(harmless_texts)} harmless texts"
            )
        if objective_kl not in ("first_token", "answer"):
            raise ValueError(f"objective_kl must be first_token or answer, got {objective_kl!r}")
        if objective_kl == "answer" and (base_answers is None or base_answers.ids.shape[0] != len(harmless_texts)):
            raise ValueError("objective_kl answer needs base_answers for every harmless text")
        self.base_answers = base_answers
        self.objective_kl = objective_kl
        self.model = unwrap(model)  # see generation.generate_ids
        self.tokenizer = tokenizer
        self.harmful_texts = list(harmful_texts)
        self.harmless_texts = list(harmless_texts)
        self.base_logprobs = base_logprobs
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.detector = detector if detector is not None else RefusalDetector()
        self.decoder = make_decoder(self.model, tokenizer, batch_size, cuda_graphs)  # chosen once, for every score
        self._responses: list[str] | None = None
        self._leading = self._record_leading_layers() if reuse_layers else None

    def _record_leading_layers(self) -> LeadingLayers | None:
        """Record, on the still unedited model, the prefills that repeat in every score."""
        start = time.perf_counter()
        leading = LeadingLayers(self.model)
        for _, enc in self._kl_batches():
            leading.record(enc, keep_cache=False)
        if self.harmful_texts:
            first = first_batch(self.model, self.tokenizer, self.harmful_texts, self.batch_size)
            leading.record(first, keep_cache=True)
        if not leading.enabled or not len(leading):
            return None
        log.info(
            "recorded %d prefills of the unedited model (%.0f MB, %.1f s): trials run them from "
            "their first edited layer",
            len(leading),
            leading.used / 1e6,
            time.perf_counter() - start,
        )
        return leading

    def _prefill_fn(self, first_edited: int | None):
        if first_edited is None or self._leading is None:
            return None
        return self._leading.prefill_from(first_edited)

    def _kl_batches(self):
        """The batches the objective's KL forwards (their prefills are the ones worth recording)."""
        if self.objective_kl == "answer":
            return answer_batches(self.model, self.tokenizer, self.harmless_texts, self.base_answers.ids,
                                  self.batch_size)
        return prompt_batches(self.model, self.tokenizer, self.harmless_texts, self.batch_size)

    def kl(self, first_edited: int | None = None) -> float:
        """The ``objective_kl`` KL of the current weights from the unedited model's."""
        if self.objective_kl == "answer":
            return self.answer_kl(first_edited)
        logprobs = first_token_logprobs(
            self.model,
            self.tokenizer,
            self.harmless_texts,
            self.batch_size,
            prefill_fn=self._prefill_fn(first_edited),
        )
        return kl_divergence(self.base_logprobs, logprobs)

    def answer_kl(self, first_edited: int | None = None) -> float:
        """KL over the first ``kl_tokens`` tokens of the unedited model's answers (needs ``base_answers``)."""
        if self.base_answers is None:
            raise ValueError("answer KL needs base_answers")
        logprobs = answer_logprobs(self.model, self.tokenizer, self.harmless_texts, self.base_answers.ids,
                                   self.batch_size, prefill_fn=self._prefill_fn(first_edited))
        return answer_kl(self.base_answers, logprobs)

    def refusals(self, first_edited: int | None = None, max_refusals: int | None = None) -> int:
        """Refusals on the harmful prompts. With ``max_refusals``, generation stops once that many
        are counted: raises :class:`~abliterate.generation.RefusalLimitReached` then."""
        self._responses = None  # a stopped generation keeps none: responses() then runs in full
        ids = self.decoder.generate(self.harmful_texts, self.max_new_tokens, self.detector, max_refusals,
                                    self._prefill_fn(first_edited))
        self._responses = self.tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []
        return sum(self.detector.is_refusal(r) for r in self._responses)

    def score(
        self,
        first_edited: int | None = None,
        refusal_cap: Callable[[float, int], tuple[int, int] | None] | None = None,
    ) -> dict:
        """``{"refusals": int, "n": int, "kl": float, "seconds": float}`` for the current weights.

        ``first_edited``: the lowest layer whose weights differ from the model this evaluator was
        built on; with ``reuse_layers``, recorded prefills then skip the layers below it. Passing a
        layer above an edited one gives wrong scores.

        ``refusal_cap(kl, n)``: ``(refusals, trial)`` of an earlier trial on ``n`` prompts with a
        lower KL, or None. KL is measured first (it is cheap); once this model's refusals reach
        that trial's, it is dominated by it whatever the rest of the generation gives, so the
        generation stops and the result has ``refusals`` at least the cap (the count so far, a
        lower bound) and ``dominated_by`` set to that trial.
        """
        start = time.perf_counter()
        kl = self.kl(first_edited)
        cap = refusal_cap(kl, len(self.harmful_texts)) if refusal_cap is not None else None
        result: dict = {"n": len(self.harmful_texts), "kl": kl}
        try:
            result["refusals"] = self.refusals(first_edited, None if cap is None else cap[0])
        except RefusalLimitReached as stop:
            result["refusals"] = stop.refusals
            result["dominated_by"] = cap[1]
        result["seconds"] = time.perf_counter() - start
        if "dominated_by" in result:
            log.info(
                "refusals >= %d/%d, KL %.4g: dominated by trial %d, generation stopped (%.1f s)",
                result["refusals"], result["n"], kl, result["dominated_by"], result["seconds"],
            )
        else:
            log.info(
                "refusals %d/%d, KL %.4g (%.1f s)", result["refusals"], result["n"], kl, result["seconds"]
            )
        return result

    def responses(self) -> list[str]:
        """Responses to the harmful prompts from the last :meth:`score` (generated now if none yet)."""
        if self._responses is None:
            self.refusals()
        return list(self._responses)


@dataclass(frozen=True)
class EvalSettings:
    """How a split is measured: generation's token budget and batch, and the refusal verdict."""

    max_new_tokens: int
    batch_size: int
    detector: RefusalDetector
    cuda_graphs: bool = True


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` found: answers to the harmful prompts and their verdicts, and the
    first-token log-probabilities on the harmless prompts (on the model's device) with their KL, and
    the KL over the base model's answers (:mod:`abliterate.answer_kl`) when they were given."""

    responses: list[str]
    refused: list[bool]
    logprobs: torch.Tensor | None = None
    kl: float | None = None
    kl_answer: float | None = None

    @property
    def refusals(self) -> int:
        return int(sum(self.refused))

    @property
    def n(self) -> int:
        return len(self.refused)

    def counts(self) -> dict:
        """``refusals`` and ``n``, and ``kl`` and ``kl_answer`` when measured: the form of every JSON summary."""
        measured = {k: v for k, v in (("kl", self.kl), ("kl_answer", self.kl_answer)) if v is not None}
        return {"refusals": self.refusals, "n": self.n, **measured}


def measure(model, tokenizer, settings: EvalSettings, harmful: Sequence[str] = (), harmless: Sequence[str] = (),
            base_logprobs: torch.Tensor | None = None, progress: bool = False,
            base_answers: BaseAnswers | None = None) -> Measurement:
    """The one measurement of a model on chat-formatted prompts, for the baseline, the final
    evaluation, the export's confirmation and the benchmarks: greedy answers to ``harmful`` (each
    stops at its first refusal marker) judged by ``settings.detector``, and first-token
    log-probabilities on ``harmless``, with the KL from ``base_logprobs`` when given, and with
    ``base_answers`` the KL over those answers (``kl_answer``, one more forward). A study trial
    scores the same way through :class:`Evaluator`, which adds recorded prefills and early stops."""
    start = time.perf_counter()
    responses = generate(model, tokenizer, harmful, settings.max_new_tokens, settings.batch_size, settings.detector,
                         progress=progress, cuda_graphs=settings.cuda_graphs) if harmful else []
    logprobs = first_token_logprobs(model, tokenizer, harmless, settings.batch_size) if harmless else None
    kl = None if base_logprobs is None or logprobs is None else kl_divergence(base_logprobs, logprobs)
    kl_answer = None
    if base_answers is not None and harmless:
        kl_answer = answer_kl(base_answers, answer_logprobs(model, tokenizer, harmless, base_answers.ids,
                                                            settings.batch_size))
    found = Measurement(responses, [settings.detector.is_refusal(r) for r in responses], logprobs, kl, kl_answer)
    scores = [f"{name} {value:.4g}" for name, value in (("KL", kl), ("answer KL", kl_answer)) if value is not None]
    log.info("measured %d harmful prompts (%d refused) and %d harmless ones%s in %.1f s", found.n, found.refusals,
             len(harmless), f" ({', '.join(scores)})" if scores else "", time.perf_counter() - start)
    return found
