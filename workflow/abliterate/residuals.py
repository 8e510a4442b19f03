"""Residual-stream activations at the position where the answer starts."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .generation import prompt_forward_inputs
from .hf_compat import input_device
from .prompting import batches, encode, length_order

log = logging.getLogger(__name__)


@torch.inference_mode()
def collect_residuals(model, tokenizer, texts: Sequence[str], batch_size: int,
                      progress: bool = True) -> torch.Tensor:
    """Hidden states of every layer at each text's last token: (n, n_layers + 1, hidden) float32, CPU.

    Index 0 is the embedding output, index ``l`` the output of decoder layer ``l``. As everywhere in
    transformers, the last entry has the model's final norm applied. The last prompt token is the
    position whose output is the first generated token, so this is where refusal is decided.

    Multimodal models are called with ``input_ids`` only, which runs their text tower alone.
    Values are upcast to float32 per batch (half-precision sums over hundreds of prompts lose
    digits); callers accumulate means in float64.
    """
    device = input_device(model)
    order = length_order(tokenizer, texts)
    out: torch.Tensor | None = None
    with tqdm(total=len(texts), desc="residuals", unit="prompt", disable=not progress) as bar:
        for chunk in batches(order, batch_size):
            enc = encode(tokenizer, [texts[i] for i in chunk], device)
            # logits_to_keep=1 (where supported): no full-vocabulary logits for every position
            inputs = prompt_forward_inputs(model, enc)
            hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
            # per layer to the CPU: layers of a model split over GPUs live on different devices
            last = torch.stack([h[:, -1, :].float().cpu() for h in hidden], dim=1)
            if out is None:
                out = torch.empty((len(texts), last.shape[1], last.shape[2]), dtype=torch.float32)
            out[torch.tensor(chunk)] = last
            bar.update(len(chunk))
    if out is None:
        raise ValueError("collect_residuals needs at least one text")
    log.info("residuals of %d prompts: %d layers (embedding included), hidden %d", *out.shape)
    return out
