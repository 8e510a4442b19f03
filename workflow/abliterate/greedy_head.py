"""The greedy next token of a float32 model on a CPU, its output layer screened in bfloat16.

A decode step of a small model with a large vocabulary spends much of its time in the output
layer: Qwen2.5-0.5B's is 151,936 × 896, a quarter of the model's weights, read in full for every
step of every row. Greedy decoding needs only each row's argmax, so the product is first taken in
bfloat16 (half the bytes, and native on CPUs with bfloat16 dot products), and only the tokens that
rounding could make the largest are computed again in float32: the chosen token is the float32
product's argmax, up to float32 rounding (the same tokens as the full product). How much a trial
gains: benchmarks/README.md, "The screened output layer".

The rounding bound: with bfloat16's unit roundoff ``u`` (2^-8), rounding ``x`` and a vocabulary row
``w`` and summing in float32 changes ``x·w`` by at most about ``2u Σ|x_i w_i| ≤ 2u ‖x‖ ‖w‖``, and
the bfloat16 result's own rounding by ``u |x·w|``. A token is a candidate when its screened logit
plus that bound reaches the largest screened logit minus its bound; :data:`MARGIN` pads the bound.

Used by :class:`~abliterate.generation.ContinuousDecoder`'s steps where :func:`screened_head` finds
the model fit: on a CPU with bfloat16 instructions, a float32 output layer without bias whose
logits are the decoder's final states times its weight (checked on a probe at first use: a model
whose forward does more than a monotone scaling of them keeps the full product).
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import hf_compat

log = logging.getLogger(__name__)

UNIT_ROUNDOFF = 2.0**-8
# the bound's factor over what the rounding can do: float32 summation and fused multiply-adds
# stay far inside it
MARGIN = 1.5
# CPU flags (Linux /proc/cpuinfo) of native bfloat16 dot products; elsewhere the bfloat16
# product is emulated and slower than the float32 one
BF16_FLAGS = ("avx512_bf16", "amx_bf16")

# models whose probe failed (they keep the full product) or passed
_UNFIT: weakref.WeakSet = weakref.WeakSet()
_FIT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in BF16_FLAGS)


class ScreenedHead:
    """``tokens(hidden)``: the argmax of ``hidden @ weight.T`` per row, screened in bfloat16.

    The bfloat16 copy and the rows' norms are made at first use and again whenever the layer's
    weight was replaced or edited in place (its version counter moved).
    """

    def __init__(self, layer: nn.Linear):
        if layer.weight.dtype != torch.float32 or layer.bias is not None:
            raise ValueError(f"a float32 output layer without bias is screened, got {layer}")
        self.layer = layer
        self._version = None
        self.candidates = 0  # float32 logits computed again, all calls together
        self.rows = 0

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def _prepare(self) -> None:
        weight = self.weight
        version = (weight.data_ptr(), weight._version)
        if version != self._version:
            self.low = weight.to(torch.bfloat16)
            self.norms = torch.linalg.vector_norm(weight, dim=1)
            self._version = version

    @torch.inference_mode()
    def tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy token ids of ``hidden`` (rows, hidden_size), int64 on ``hidden``'s device."""
        self._prepare()
        x = hidden.to(self.weight.dtype)
        screened = F.linear(x.to(torch.bfloat16), self.low).float()
        candidate = candidates(screened, rounding_bound(x, self.norms, screened))
        union = candidate.any(0).nonzero().squeeze(1)  # ascending: ties go to the lowest id, as argmax's
        exact = F.linear(x, self.weight[union])
        exact = exact.masked_fill(~candidate[:, union], float("-inf"))
        self.candidates += union.numel()
        self.rows += x.shape[0]
        return union[exact.argmax(dim=1)]


def rounding_bound(x: torch.Tensor, norms: torch.Tensor, screened: torch.Tensor) -> torch.Tensor:
    """How far each bfloat16-screened logit can be from the float32 one (module doc), padded by
    :data:`MARGIN`: ``x`` the float32 states, ``norms`` the weight rows' norms."""
    return MARGIN * UNIT_ROUNDOFF * (2 * torch.linalg.vector_norm(x, dim=1, keepdim=True) * norms + screened.abs())


def candidates(screened: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Per row, the tokens whose logit, within ``bound`` of ``screened``, can still be the largest."""
    floor = (screened - bound).amax(dim=1, keepdim=True)
    return screened + bound >= floor


def screened_head(model) -> ScreenedHead | None:
    """The model's output layer, screened, or None where the full product is used (see module doc)."""
    if model in _UNFIT:
        return None
    if model in _FIT:
        return _FIT[model]
    head = _fit(model)
    if head is None:
        _UNFIT.add(model)
    else:
        _FIT[model] = head
    return head


def set_screening(model, enabled: bool) -> None:
    """Turn screening off for ``model`` (its steps take the full product), or back on where it fits
    (a head already made is kept meanwhile, so that turning it on again costs nothing)."""
    if enabled:
        _UNFIT.discard(model)
    else:
        _UNFIT.add(model)


def _fit(model) -> ScreenedHead | None:
    if hf_compat.input_device(model).type != "cpu" or not cpu_has_bf16():
        return None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if type(out) is not nn.Linear or out.bias is not None or decoder is None or out.weight.dtype != torch.float32:
        return None
    head = ScreenedHead(out)
    try:
        fits = _probe(model, decoder, head)
    except Exception as error:  # noqa: BLE001 - a decoder that cannot be called like a Llama's
        log.info("decode steps take the full output product: the decoder alone failed on a probe (%s)", error)
        return None
    if not fits:
        log.info("decode steps take the full output product: this model's logits are not its "
                 "decoder's states times the output weight")
        return None
    log.info("decode steps screen the output layer (%d × %d) in bfloat16, exact in float32",
             *out.weight.shape)
    return head


@torch.inference_mode()
def _probe(model, decoder, head: ScreenedHead) -> bool:
    """The screened tokens of a short sequence must be the model's own greedy ones at every position,
    the decoder called as :func:`greedy_step` calls it (mask, positions, a KV cache)."""
    vocab = head.weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 16), generator=generator).to(hf_compat.input_device(model))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if hf_compat.accepts_position_ids(model):
        inputs["position_ids"] = torch.arange(ids.shape[1], device=ids.device)[None]
    logits = model(**inputs, use_cache=False).logits[0]  # every position's
    out = decoder(**inputs, **hf_compat.cache_arg(hf_compat.new_cache(model)), use_cache=True)
    return bool(torch.equal(head.tokens(out.last_hidden_state[0]), logits.argmax(-1)))


def greedy_step(decoder, head: ScreenedHead, **inputs) -> tuple[torch.Tensor, object]:
    """One decode step through ``decoder`` (the model's ``get_decoder()``) and ``head``:
    ``(next tokens, KV cache)``."""
    out = decoder(**inputs)
    return head.tokens(out.last_hidden_state[:, -1]), hf_compat.output_cache(out)
