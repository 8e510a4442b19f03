"""Tiny random transformers models built from configs (no download), shared by the test modules.

Every model is float32, seeded and in eval mode. The text hidden size is ``HIDDEN`` (64) while attention
works in ``HEADS * HEAD_DIM`` (32) and MLPs in ``INTERMEDIATE`` (96) or ``MOE_INTERMEDIATE`` (48), so no
weight matrix of a text tower is (hidden, hidden): a (hidden, hidden) tensor appearing during an edit
can only be a forbidden projector. GPT-2 is the exception (its ``attn.c_proj`` is square by design).
"""

from __future__ import annotations

import torch

HIDDEN = 64
HEADS = 4
HEAD_DIM = 8
KV_HEADS = 2
INTERMEDIATE = 96
MOE_INTERMEDIATE = 48
VOCAB = 128
LAYERS = 3
SEED = 0

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _build(model_cls, config, seed: int = SEED):
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    return model


def tiny_llama(seed: int = SEED):
    """LlamaForCausalLM, 3 layers: o_proj (64, 32), down_proj (64, 96)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(LlamaForCausalLM, LlamaConfig(**_COMMON), seed)


def tiny_qwen3(seed: int = SEED):
    """Qwen3ForCausalLM (q/k norms), 3 layers."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(Qwen3ForCausalLM, Qwen3Config(**_COMMON), seed)


def _gemma3_text_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**_COMMON, sliding_window=8, query_pre_attn_scalar=HEAD_DIM)


def tiny_gemma3_text(seed: int = SEED):
    """Gemma3ForCausalLM (text only, sandwich norms, sliding-window layers), 3 layers."""
    from transformers import Gemma3ForCausalLM

    return _build(Gemma3ForCausalLM, _gemma3_text_config(), seed)


def tiny_moe_fused(seed: int = SEED):
    """Qwen3MoeForCausalLM whose experts are fused 3-D tensors (E, out, in) = (4, 64, 48).

    Layer 1 is a dense MLP (``mlp_only_layers``), so the model mixes both kinds of ``mlp_down``.
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        **_COMMON,
        moe_intermediate_size=MOE_INTERMEDIATE,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        norm_topk_prob=True,
    )
    config._experts_implementation = "eager"
    return _build(Qwen3MoeForCausalLM, config, seed)


def tiny_gpt_oss(seed: int = SEED):
    """GptOssForCausalLM: fused experts stored transposed, (E, in, out) = (4, 48, 64), with biases."""
    from transformers import GptOssConfig, GptOssForCausalLM

    common = {k: v for k, v in _COMMON.items() if k != "intermediate_size"}
    config = GptOssConfig(
        **common,
        intermediate_size=MOE_INTERMEDIATE,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        # the YaRN defaults assume 131k positions and warn at this size
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    config._experts_implementation = "eager"
    return _build(GptOssForCausalLM, config, seed)


def tiny_multimodal(seed: int = SEED):
    """Gemma3ForConditionalGeneration: Gemma3 text tower (hidden 64) plus a 1-layer SigLIP tower (hidden 48)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=_gemma3_text_config(),
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
    )
    return _build(Gemma3ForConditionalGeneration, config, seed)


def tiny_gpt2(seed: int = SEED):
    """GPT2LMHeadModel: transformers Conv1D layers, weights stored (in, out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        n_positions=32,  # wpe must not be (hidden, hidden)
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _build(GPT2LMHeadModel, config, seed)


def input_ids(batch: int = 2, seq: int = 7, seed: int = SEED) -> torch.Tensor:
    """Token ids avoiding the special and image tokens of the tiny vocabularies."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB - 4, (batch, seq), generator=gen)


FACTORIES = {
    "llama": tiny_llama,
    "qwen3": tiny_qwen3,
    "gemma3_text": tiny_gemma3_text,
    "moe_fused": tiny_moe_fused,
    "gpt_oss": tiny_gpt_oss,
    "multimodal": tiny_multimodal,
    "gpt2": tiny_gpt2,
}
