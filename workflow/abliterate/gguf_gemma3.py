"""What a Gemma 3 text model (``Gemma3ForCausalLM``) needs beyond the shared GGUF conversion.

llama.cpp's gemma3 graph reads few hyperparameters and fixes the rest (its llama-model.cpp): every
sixth layer global, local layers rotating with base 10000, queries scaled by 1/sqrt(head_dim), no
attention-logit soft-capping, GELU (tanh) MLPs. A checkpoint that differs would run differently there,
so it is refused before anything is written rather than converted silently wrong. Gemma's RMSNorm
scales by (1 + weight); llama.cpp's converter stores weight + 1 and transformers' GGUF loader takes
the 1 back off, so the norm tensors are shifted here.
"""

from __future__ import annotations

import numpy as np

from . import gguf_export
from .errors import ConfigError

MODEL_TYPE = "gemma3_text"
PATTERN = 6  # llama.cpp's fixed local:global interleave: layer i is global when (i + 1) % 6 == 0
LOCAL_ROPE_BASE = 10000.0
ACTIVATION = "gelu_pytorch_tanh"


def check(config) -> None:
    """A ConfigError naming ``merge.gguf`` for a Gemma 3 that llama.cpp's gemma3 graph would run differently."""
    expected_types = ["full_attention" if (i + 1) % PATTERN == 0 else "sliding_attention"
                      for i in range(config.num_hidden_layers)]
    rope = config.rope_parameters or {}
    local, full = rope.get("sliding_attention") or {}, rope.get("full_attention") or {}
    problems = [
        (list(config.layer_types) != expected_types,
         f"layer types {config.layer_types} are not llama.cpp's fixed pattern (every {PATTERN}th layer global)"),
        (config.query_pre_attn_scalar != config.head_dim,
         (f"query_pre_attn_scalar {config.query_pre_attn_scalar} is not head_dim {config.head_dim}, the "
          "scale llama.cpp uses")),
        (config.attn_logit_softcapping is not None, "attn_logit_softcapping is set and llama.cpp's gemma3 has none"),
        (config.hidden_activation != ACTIVATION, f"the MLP activation {config.hidden_activation} is not {ACTIVATION}"),
        (local.get("rope_theta") != LOCAL_ROPE_BASE,
         f"the local layers' RoPE base {local.get('rope_theta')} is not llama.cpp's fixed {LOCAL_ROPE_BASE:g}"),
        (any(r.get("rope_type", "default") != "default" for r in (local, full)),
         "RoPE scaling is not written by this converter"),
    ]
    for failed, why in problems:
        if failed:
            raise ConfigError(f"{gguf_export.KEY}: this Gemma 3's {why}; set {gguf_export.KEY}: null and convert "
                              "results/<run>/model with llama.cpp's convert_hf_to_gguf.py")


def rope_base(config) -> float:
    """The global layers' RoPE base, the one GGUF's rope.freq_base holds."""
    return float(config.rope_parameters["full_attention"]["rope_theta"])


def hyperparameters(writer, config) -> None:
    """The keys llama.cpp's converter adds for gemma3."""
    writer.add_sliding_window(config.sliding_window)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def to_gguf(weight: np.ndarray, name: str) -> np.ndarray:
    """Norm weights as llama.cpp's converter stores them: the (1 + weight) Gemma's RMSNorm multiplies by."""
    return weight + np.float32(1.0) if name.endswith("norm.weight") else weight
