"""KL over the opening of the original model's own answers (``evaluation.kl_tokens``).

First-token KL sees only where an answer starts. Here the unedited model's greedy answer to each
harmless prompt is fed back, teacher-forced, behind its prompt: one forward per batch gives the
edited model's distribution at each of the first N answer positions, and KL(base ‖ edited) is
averaged over the positions of each answer (those after its EOS do not count), then over prompts.
With N = 1 the input is the prompt alone and the value is :func:`kl.kl_divergence` itself.

The base side cannot be recomputed in a trial (the base weights are edited), so the baseline rule
stores it. Position 0 reads the first-token store the baseline keeps anyway, (n, vocab) float32, so
it is exact. Positions 1..N-1 keep only the base's top ``k`` log-probabilities (``evaluation.kl_top_k``,
float32 values, int64 ids) and the log of the mass left outside them (the tail, p_rest): the answer
ids and lengths plus n x (N-1) x (12k + 4) bytes per split instead of n x (N-1) x vocab x 4. There the
KL is that of the coarsened distributions, whose buckets are the k stored tokens and one rest bucket:

    KL_c(P ‖ Q) = sum_{i in top k} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest).

Both tails are a logsumexp over the tokens outside the top k (no 1 - sum, which cancels), so KL_c is a
KL between two distributions and ≥ 0 up to rounding, checked like the first-token KL. Merging
buckets cannot increase a KL (the data-processing inequality): KL_c ≤ the exact KL, equal to it when
the base's tail mass is 0, and a k at least the vocabulary stores every token, an empty tail, so the
value is the exact KL up to summation order. The baseline logs the mean tail mass per split: the
smaller it is, the tighter the bound. float16 values are not used: they would round the log-probabilities
of the rare tokens the sum runs over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .architecture import unwrap
from .errors import ConfigError
from .generation import generate_ids, prefill
from .hf_compat import input_device
from .kl import check_logprobs, checked, first_token_logprobs, kl_divergence
from .prompting import batches, encode, length_order

log = logging.getLogger(__name__)

_KEYS = ("answer_ids", "answer_lengths", "answer_top_logprobs", "answer_top_ids", "answer_tail_logprobs")
_FULL_KEY = "answer_logprobs"  # the layout before evaluation.kl_top_k: the whole vocabulary per position


@dataclass(frozen=True)
class BaseAnswers:
    """The unedited model's greedy answers to harmless prompts, and its log-probabilities on them.

    ``ids`` (n, N) int64, each row padded after the answer's end with its last token; ``lengths``
    (n,) int64, the positions that count (through the EOS, at most N); ``first`` (n, vocab) float32,
    the first-token log-probabilities (the baseline's first-token store, position 0); for positions
    1..N-1 (computed teacher-forced like the edited side) ``top_logprobs`` (n, N-1, k) float32 and
    ``top_ids`` (n, N-1, k) int64, the k most likely tokens, and ``tail`` (n, N-1) float32, the log of
    the mass outside them (-inf where k covers the vocabulary).
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    first: torch.Tensor
    top_logprobs: torch.Tensor
    top_ids: torch.Tensor
    tail: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[1])

    @property
    def top_k(self) -> int:
        """The tokens stored per position: ``evaluation.kl_top_k``, at most the vocabulary."""
        return int(self.top_ids.shape[-1])

    def mean_tail_mass(self) -> float | None:
        """The base's mass outside the top k, averaged over the counted positions 1..N-1 (None: none)."""
        counted = _counted(self.lengths.to(self.tail.device), self.n_tokens)[:, 1:]
        if not bool(counted.any()):
            return None
        return self.tail.exp()[counted].double().mean().item()

    def tensors(self, split: str) -> dict[str, torch.Tensor]:
        """Named for the baseline's safetensors file, beside the split's first-token tensor (``first``,
        stored once, under the split's name)."""
        values = (self.ids, self.lengths, self.top_logprobs, self.top_ids, self.tail)
        return {f"{key}.{split}": value for key, value in zip(_KEYS, values)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], split: str,
                     path: str = "the baseline file") -> BaseAnswers | None:
        """The split's answers from a baseline file; None for a file written before they were stored."""
        if f"{_FULL_KEY}.{split}" in tensors:
            raise ConfigError(f"{path} stores the answer KL's base log-probabilities over the whole vocabulary, "
                              "the layout before evaluation.kl_top_k: rerun the baseline rule")
        if not all(f"{key}.{split}" in tensors for key in _KEYS):
            return None
        ids, lengths, top_logprobs, top_ids, tail = (tensors[f"{key}.{split}"] for key in _KEYS)
        return cls(ids, lengths, tensors[split], top_logprobs, top_ids, tail)


def _counted(lengths: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(n, N) bool: the positions of each answer up to its EOS."""
    return torch.arange(n_tokens, device=lengths.device) < lengths[:, None]


def tail_logprobs(logprobs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log of the mass outside ``top_ids`` at each position: a logsumexp over the other tokens, so a
    small tail keeps its digits (1 - sum of the top k would cancel them); -inf where none is left."""
    outside = logprobs.scatter(-1, top_ids.to(logprobs.device), float("-inf"))
    return torch.logsumexp(outside, dim=-1)


def _kl_terms(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p (log p - log q) elementwise from log-probabilities; 0 where p is 0 (an empty tail)."""
    return torch.where(torch.isneginf(p), 0.0, p.exp() * (p - q))


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


def base_answers(model, tokenizer, texts: Sequence[str], n_tokens: int, batch_size: int, top_k: int,
                 cuda_graphs: bool = True, first: torch.Tensor | None = None) -> BaseAnswers:
    """The unedited ``model``'s greedy answers of at most ``n_tokens`` tokens and its log-probabilities
    on them (teacher-forced, as trials compute theirs), the ``top_k`` largest per position after the
    first. ``first``: the model's first-token log-probabilities on ``texts`` where already measured
    (the baseline's store), else measured here."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}")
    if top_k < 1:
        raise ValueError(f"top_k (evaluation.kl_top_k) must be at least 1, got {top_k}")
    answers = generate_ids(model, tokenizer, texts, n_tokens, batch_size, cuda_graphs=cuda_graphs)
    lengths = torch.tensor([len(a) for a in answers], dtype=torch.int64)
    if int(lengths.min()) < 1:
        raise ValueError("an answer of no tokens: generation must give each prompt at least one")
    ids = torch.tensor([a + a[-1:] * (n_tokens - len(a)) for a in answers], dtype=torch.int64)
    device = input_device(unwrap(model))
    ids, lengths = ids.to(device), lengths.to(device)
    if first is None:
        first = first_token_logprobs(model, tokenizer, texts, batch_size)
    if n_tokens == 1:  # the first-token store is all there is: no forward over the answers
        later = first.new_empty(len(texts), 0, first.shape[-1])
    else:
        later = answer_logprobs(model, tokenizer, texts, ids, batch_size)[:, 1:]
    top_logprobs, top_ids = torch.topk(later, min(top_k, later.shape[-1]), dim=-1)
    found = BaseAnswers(ids, lengths, first, top_logprobs, top_ids, tail_logprobs(later, top_ids))
    log.info("base answers to %d harmless prompts: %.1f of %d tokens on average before EOS, the top %d of %d "
             "tokens kept per position after the first", len(texts), lengths.double().mean().item(), n_tokens,
             found.top_k, first.shape[-1])
    return found


def answer_kl(base: BaseAnswers, logprobs: torch.Tensor) -> float:
    """KL(base ‖ edited) averaged over each answer's positions up to its EOS, then over prompts:
    exact at position 0, over the coarsened distributions (top k + rest, see the module) after it.

    ``logprobs``: the edited model's :func:`answer_logprobs` on ``base.ids``. Checked like
    :func:`kl.kl_divergence` (a negative value beyond rounding raises, nothing is clamped).
    """
    expected = (*base.ids.shape, base.first.shape[-1])
    if tuple(logprobs.shape) != expected or base.top_ids.shape[1] != base.n_tokens - 1:
        raise ValueError(f"shape mismatch: edited {tuple(logprobs.shape)}, base answers {tuple(base.ids.shape)} with "
                         f"{tuple(base.first.shape)} first-token and {tuple(base.top_ids.shape)} top-k tensors; "
                         "expected (n, N, vocab), (n, vocab) and (n, N - 1, k)")
    if base.n_tokens == 1:
        # one position, all of it counted: the first-token KL, summed in the same order
        return kl_divergence(base.first, logprobs[:, 0])
    check_logprobs(base.first, logprobs[:, 0])
    logprobs = logprobs.to(base.first.device)
    first = F.kl_div(logprobs[:, 0], base.first, reduction="none", log_target=True).sum(dim=-1)
    later, top_ids = logprobs[:, 1:], base.top_ids.to(logprobs.device)
    coarse = (_kl_terms(base.top_logprobs, later.gather(-1, top_ids)).sum(dim=-1)
              + _kl_terms(base.tail, tail_logprobs(later, top_ids)))
    per_position = torch.cat([first[:, None], coarse], dim=1)
    counted = _counted(base.lengths.to(per_position.device), base.n_tokens)
    # where, not a product: a non-finite value past an EOS must not turn the mean into NaN
    per_prompt = torch.where(counted, per_position, 0.0).sum(dim=-1) / counted.sum(dim=-1)
    return checked(per_prompt.mean().item())
