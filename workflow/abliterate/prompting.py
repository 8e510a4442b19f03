"""Turn prompts into chat-formatted texts and left-padded token batches.

Every function of this package that takes ``texts`` expects the output of :func:`chat_texts`: the
full chat-formatted string that ends where the assistant's answer begins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

from .errors import ModelLoadError

log = logging.getLogger(__name__)

T = TypeVar("T")


def chat_texts(tokenizer, prompts: list[str], system_prompt: str | None = None) -> list[str]:
    """Render each prompt as one user turn (after an optional system turn) plus the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "set `model.chat_template` in the config (a Jinja template, or a file holding one)")
    from jinja2 import TemplateError

    texts = []
    for prompt in prompts:
        messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        messages.append({"role": "user", "content": prompt})
        try:
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        except TemplateError as exc:
            # templates raise on turns they do not accept; the usual one is a system turn
            hint = ("model.system_prompt is set and this template may not accept a system turn: set it to "
                    "null" if system_prompt is not None else "fix model.chat_template")
            raise ModelLoadError(f"the chat template of {getattr(tokenizer, 'name_or_path', '?')!r} rejected "
                                 f"a prompt ({exc}); {hint}") from exc
    return texts


def adds_bos_itself(tokenizer, texts: Sequence[str]) -> bool:
    """True when the texts already start with the BOS token (the chat template wrote it).

    Tokenising with special tokens on top would then give a doubled BOS, which shifts every model
    off its training distribution; a template without BOS keeps the tokenizer's own special tokens.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and len(texts) > 0 and all(t.startswith(bos) for t in texts)


def encode(tokenizer, texts: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` into a left-padded batch on ``device`` (``input_ids``, ``attention_mask``).

    Left padding puts every prompt's last token in the last column, which is where generation
    continues and where residuals and first-token log-probabilities are read. ``padding_side`` is
    passed per call, so the tokenizer object is left as it was.
    """
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=not adds_bos_itself(tokenizer, texts))
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def length_order(tokenizer, texts: Sequence[str]) -> list[int]:
    """Indices of ``texts`` from longest to shortest token count (stable).

    Batches of similar lengths waste little compute on padding, and the longest batch runs first,
    so a batch size that does not fit in memory fails at once rather than at the end.
    """
    # token counts as encode() produces them, without padding
    ids = tokenizer(list(texts), add_special_tokens=not adds_bos_itself(tokenizer, texts))["input_ids"]
    lengths = [len(x) for x in ids]
    return sorted(range(len(texts)), key=lambda i: -lengths[i])


def batches(seq: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``seq`` of at most ``size`` items."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    for start in range(0, len(seq), size):
        yield seq[start : start + size]
