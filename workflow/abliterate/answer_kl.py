"""KL over the opening of the original model's own answers (``evaluation.kl_tokens``).

First-token KL sees only where an answer starts. Here the unedited model's greedy answer to each
harmless prompt is fed back, teacher-forced, behind its prompt: one forward per batch gives the
edited model's distribution at each of the first N answer positions, and KL(base ‖ edited) is
averaged over the positions of each answer (those after its EOS do not count), then over prompts.
With N = 1 the input is the prompt alone and the value is :func:`kl.kl_divergence` itself.

The base side cannot be recomputed in a trial (the base weights are edited), so the baseline rule
stores it: the answer ids (int64) and lengths, and the base log-probabilities at every answer
position over the whole vocabulary in float32, n x N x vocab x 4 bytes. A top-k store would make
the KL a lower bound of the true one (the tail's mass merged into one bucket) and a float16 store
rounds the rare tokens' log-probabilities that the KL sums over; both give a signal other than the
one measured, so neither is used. The baseline's first-token tensors stay as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .architecture import unwrap
from .generation import generate_ids, prefill
from .hf_compat import input_device
from .kl import check_logprobs, checked, kl_divergence
from .prompting import batches, encode, length_order

log = logging.getLogger(__name__)

_KEYS = ("answer_ids", "answer_lengths", "answer_logprobs")


@dataclass(frozen=True)
class BaseAnswers:
    """The unedited model's greedy answers to harmless prompts, and its log-probabilities on them.

    ``ids`` (n, N) int64, each row padded after the answer's end with its last token; ``lengths``
    (n,) int64, the positions that count (through the EOS, at most N); ``logprobs`` (n, N, vocab)
    float32, the base distribution at each position, computed teacher-forced like the edited side.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[1])

    def tensors(self, split: str) -> dict[str, torch.Tensor]:
        """Named for the baseline's safetensors file, beside the split's first-token tensor."""
        return {f"{key}.{split}": value for key, value in zip(_KEYS, (self.ids, self.lengths, self.logprobs))}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], split: str) -> BaseAnswers | None:
        """The split's answers from a baseline file; None for a file written before they were stored."""
        if not all(f"{key}.{split}" in tensors for key in _KEYS):
            return None
        return cls(*(tensors[f"{key}.{split}"] for key in _KEYS))


def answer_batches(model, tokenizer, texts: Sequence[str], answer_ids: torch.Tensor, batch_size: int):
    """``(indices, encoded batch)``: each prompt followed by the first N - 1 tokens of its answer.

    Left padding keeps every row's last answer token in the last column, so the batch is a prompt
    batch to :func:`generation.prefill` (shared prefix, recorded leading layers). The tokens after
    an answer's EOS are attended to only by positions that do not count.
    """
    device = input_device(model)
    forced = answer_ids[:, : answer_ids.shape[1] - 1]
    for chunk in batches(length_order(tokenizer, texts), batch_size):
        enc = encode(tokenizer, [texts[i] for i in chunk], device)
        if forced.shape[1]:
            tail = forced[list(chunk)].to(device)  # ids change device, never dtype
            enc = {"input_ids": torch.cat([enc["input_ids"], tail], dim=1),
                   "attention_mask": torch.cat([enc["attention_mask"], torch.ones_like(tail)], dim=1)}
        yield chunk, enc


@torch.inference_mode()
def answer_logprobs(model, tokenizer, texts: Sequence[str], answer_ids: torch.Tensor, batch_size: int,
                    prefill_fn: Callable | None = None) -> torch.Tensor:
    """Log-probabilities at the N answer positions, (n, N, vocab) float32 on the model's device.

    One cache-less forward per batch over prompt + answer; the softmax in float32 for the reason
    :func:`kl.first_token_logprobs` gives. ``prefill_fn`` replaces :func:`generation.prefill`.
    """
    if not texts:
        raise ValueError("answer_logprobs needs at least one text")
    if answer_ids.shape[0] != len(texts):
        raise ValueError(f"{answer_ids.shape[0]} answers for {len(texts)} texts")
    prefill_fn = prefill_fn or prefill
    model = unwrap(model)  # see generation.generate_ids
    n_tokens = int(answer_ids.shape[1])
    rows: list[torch.Tensor] = [None] * len(texts)  # type: ignore[list-item]
    for chunk, enc in answer_batches(model, tokenizer, texts, answer_ids, batch_size):
        logits = prefill_fn(model, enc, use_cache=False, logits_to_keep=n_tokens)[0].logits[:, -n_tokens:]
        if logits.shape[1] != n_tokens:  # a shared prefix reaching into the answers: identical prompts
            raise ValueError(f"the forward kept {logits.shape[1]} of {n_tokens} answer positions; "
                             "are some harmless prompts identical?")
        for i, row in zip(chunk, F.log_softmax(logits.float(), dim=-1)):
            rows[i] = row
    return torch.stack(rows)


def base_answers(model, tokenizer, texts: Sequence[str], n_tokens: int, batch_size: int,
                 cuda_graphs: bool = True) -> BaseAnswers:
    """The unedited ``model``'s greedy answers of at most ``n_tokens`` tokens and its log-probabilities
    on them (teacher-forced, as trials compute theirs, so the unedited model scores exactly 0)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}")
    answers = generate_ids(model, tokenizer, texts, n_tokens, batch_size, cuda_graphs=cuda_graphs)
    lengths = torch.tensor([len(a) for a in answers], dtype=torch.int64)
    if int(lengths.min()) < 1:
        raise ValueError("an answer of no tokens: generation must give each prompt at least one")
    ids = torch.tensor([a + a[-1:] * (n_tokens - len(a)) for a in answers], dtype=torch.int64)
    device = input_device(unwrap(model))
    ids, lengths = ids.to(device), lengths.to(device)
    logprobs = answer_logprobs(model, tokenizer, texts, ids, batch_size)
    log.info("base answers to %d harmless prompts: %.1f of %d tokens on average before EOS (%.0f MB of "
             "log-probabilities)", len(texts), lengths.double().mean().item(), n_tokens,
             logprobs.numel() * logprobs.element_size() / 1e6)
    return BaseAnswers(ids, lengths, logprobs)


def answer_kl(base: BaseAnswers, logprobs: torch.Tensor) -> float:
    """KL(base ‖ edited) averaged over each answer's positions up to its EOS, then over prompts.

    ``logprobs``: the edited model's :func:`answer_logprobs` on ``base.ids``. Checked like
    :func:`kl.kl_divergence` (a negative value beyond rounding raises, nothing is clamped).
    """
    if base.logprobs.shape != logprobs.shape or base.logprobs.ndim != 3:
        raise ValueError(f"shape mismatch: base {tuple(base.logprobs.shape)} vs {tuple(logprobs.shape)}, "
                         "expected (n, N, vocab) both")
    if base.n_tokens == 1:
        # one position, all of it counted: the first-token KL, summed in the same order
        return kl_divergence(base.logprobs[:, 0], logprobs[:, 0])
    check_logprobs(base.logprobs[:, 0], logprobs[:, 0])
    logprobs = logprobs.to(base.logprobs.device)
    per_position = F.kl_div(logprobs, base.logprobs, reduction="none", log_target=True).sum(dim=-1)
    counted = torch.arange(base.n_tokens, device=per_position.device) < base.lengths.to(per_position.device)[:, None]
    # where, not a product: a non-finite value past an EOS must not turn the mean into NaN
    per_prompt = torch.where(counted, per_position, 0.0).sum(dim=-1) / counted.sum(dim=-1)
    return checked(per_prompt.mean().item())
