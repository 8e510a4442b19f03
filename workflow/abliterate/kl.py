"""How far an edited model's first-token distribution moved from the original's, on harmless prompts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .architecture import unwrap
from .generation import prefill
from .hf_compat import input_device
from .kl_value import checked
from .prompting import batches, encode, length_order

log = logging.getLogger(__name__)


@torch.inference_mode()
def first_token_logprobs(
    model, tokenizer, texts: Sequence[str], batch_size: int, prefill_fn: Callable | None = None
) -> torch.Tensor:
    """Log-probabilities of the first response token, (n, vocab) float32 on the model's device.

    Read at the last prompt position (left padding puts it in the last column); only that
    position's logits are computed where the model supports ``logits_to_keep``. The softmax runs in
    float32 whatever the model's dtype, since half-precision log-probabilities of rare tokens are
    too coarse for a KL divergence. ``prefill_fn`` replaces :func:`generation.prefill`.
    """
    prefill_fn = prefill_fn or prefill
    model = unwrap(model)  # see generation.generate_ids
    rows: list[torch.Tensor] = [None] * len(texts)  # type: ignore[list-item]
    for chunk, enc in prompt_batches(model, tokenizer, texts, batch_size):
        logits = prefill_fn(model, enc, use_cache=False)[0].logits[:, -1]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        for i, row in zip(chunk, logprobs):
            rows[i] = row
    if not rows:
        raise ValueError("first_token_logprobs needs at least one text")
    return torch.stack(rows)


def prompt_batches(model, tokenizer, texts: Sequence[str], batch_size: int):
    """``(indices, encoded batch)`` pairs in the order :func:`first_token_logprobs` forwards them."""
    device = input_device(model)
    for chunk in batches(length_order(tokenizer, texts), batch_size):
        yield chunk, encode(tokenizer, [texts[i] for i in chunk], device)


def kl_per_prompt(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ edited) of each prompt, shape (n,), on the base's device.

    Paired comparisons of two edited models on the same prompts need the per-prompt values; the
    mean is :func:`kl_divergence` up to summation order. Same input checks, no sign check: one
    prompt's rounding may go below zero where the mean does not.
    """
    check_logprobs(base_logprobs, logprobs)
    logprobs = logprobs.to(base_logprobs.device)
    return F.kl_div(logprobs, base_logprobs, reduction="none", log_target=True).sum(dim=-1)


def check_logprobs(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> None:
    if base_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"shape mismatch: base {tuple(base_logprobs.shape)} vs {tuple(logprobs.shape)}"
        )
    if base_logprobs.ndim != 2 or base_logprobs.shape[0] == 0:
        raise ValueError(
            f"expected (n, vocab) log-probabilities with n > 0, got {tuple(base_logprobs.shape)}"
        )


def kl_divergence(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """KL(base ‖ edited), summed over the vocabulary and averaged over prompts (batchmean).

    Both arguments are log-probabilities of shape (n, vocab). Rounding can make an exact zero come
    out as a tiny negative number; values down to ``-1e-6`` are returned as computed (not clamped,
    so they stay visible), anything lower, NaN or infinite raises :class:`NumericalError`, since it
    means mismatched inputs or a broken model rather than a small divergence.
    """
    check_logprobs(base_logprobs, logprobs)
    logprobs = logprobs.to(base_logprobs.device)
    # F.kl_div(input, target) is KL(target ‖ input): the base distribution is the target
    value = F.kl_div(logprobs, base_logprobs, reduction="batchmean", log_target=True).item()
    return checked(value)
