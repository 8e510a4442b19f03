"""How the installed transformers names the KV cache, for the forward passes we drive ourselves.

transformers 5.x renamed the forward argument and output field ``past_key_values`` to ``cache``,
keeping the old name as a deprecated alias (a warning on every call) until 5.40. Every decoding
path passes and reads the cache through this module, so one check serves both namings.
"""

from __future__ import annotations

import dataclasses

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    else "past_key_values"
)


def cache_arg(cache) -> dict:
    """The forward keyword argument that hands ``cache`` to the model."""
    return {CACHE: cache}


def output_cache(out):
    """The KV cache a forward pass returned."""
    return getattr(out, CACHE)
