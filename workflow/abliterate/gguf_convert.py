"""A merged safetensors model converted whole into one GGUF file llama.cpp runs.

The hyperparameters llama.cpp reads for the architecture, the byte-level BPE tokenizer (tokens in id
order, their types, merges, special ids, the pre-tokenizer's name) and the chat template go into the
metadata; every tensor is renamed by gguf's tensor map, put in llama.cpp's layout and written in the
chosen type. Architectures are added here one at a time, each with a round-trip test.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import gguf_export, gguf_gemma3, io
from .errors import ConfigError

log = logging.getLogger(__name__)

# transformers model_type -> GGUF architecture this converter writes
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", gguf_gemma3.MODEL_TYPE: "gemma3"}

# The split regexes of the pre-tokenizers llama.cpp names (its llama-vocab.cpp); tokenizers whose
# pre-tokenizer matches none are written as "default" with a warning.
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_BY_REGEX = {_QWEN2: "qwen2", _LLAMA3: "llama-bpe"}


def check_architecture(config) -> str:
    """The GGUF architecture of ``config``; a ConfigError naming ``merge.gguf`` for one without a map here."""
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise ConfigError(
            f"{gguf_export.KEY}: {config.model_type} is an architecture without a tensor map in this converter "
            f"(it converts {', '.join(sorted(ARCHS))}); set {gguf_export.KEY}: null and convert "
            "results/<run>/model with llama.cpp's convert_hf_to_gguf.py")
    if arch == "gemma3":  # its rope_parameters are per attention type, checked there
        gguf_gemma3.check(config)
        return arch
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"{gguf_export.KEY}: the model's RoPE scaling {rope.get('rope_type')!r} is not written "
                          "by this converter; set merge.gguf: null and use llama.cpp's convert_hf_to_gguf.py")
    return arch


def convert(model_dir: Path, out_path: Path, qt) -> dict:
    from gguf import GGUFWriter
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    arch = check_architecture(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    writer = GGUFWriter(None, arch)
    writer.add_name(model_dir.parent.name)
    _hyperparameters(writer, config)
    _tokenizer(writer, tokenizer, config.vocab_size)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for file in _weight_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                name = gguf_export.gguf_name(hf_name, arch, config.num_hidden_layers, gguf_export.KEY)
                # the quantizers take float32 numpy arrays
                weight = gguf_export.to_gguf_layout(f.get_tensor(hf_name).float().numpy(), name, arch, heads,
                                                    kv_heads)
                if arch == "gemma3":
                    weight = gguf_gemma3.to_gguf(weight, name)
                data, written = gguf_export.encode(weight, qt)
                writer.add_tensor(name, data, raw_dtype=written)
    with io.atomic_path(out_path) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"source_kind": "safetensors", "architecture": arch}


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / n for n in sorted(set(io.read_json(index)["weight_map"].values()))]
    return [model_dir / "model.safetensors"]


def _hyperparameters(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.model_type == gguf_gemma3.MODEL_TYPE:
        theta = gguf_gemma3.rope_base(config)
        gguf_gemma3.hyperparameters(writer, config)
    else:
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(0)  # the "mostly" type is informational; each tensor states its own


def _tokenizer(writer, tokenizer, vocab_size: int) -> None:
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec["model"], spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ConfigError(f"{gguf_export.KEY}: the tokenizer is {model.get('type')} with a {decoder.get('type')} "
                          "decoder; this converter writes byte-level BPE tokenizers only, not SentencePiece-style "
                          "ones such as Gemma's or Llama 2's; set merge.gguf: null and use llama.cpp's "
                          "convert_hf_to_gguf.py")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):  # rows of the embedding beyond the tokenizer are padding llama.cpp never emits
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        types.append(TokenType.UNUSED if i not in by_id else TokenType.CONTROL if added.get(token)
                     else TokenType.USER_DEFINED if token in added else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer") or {}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not merges:  # llama.cpp refuses a byte-level vocabulary without them, and GGUF has no empty array
        raise ConfigError(f"{gguf_export.KEY}: the tokenizer has no BPE merges, which llama.cpp needs; set "
                          f"{gguf_export.KEY}: null")
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(token_id)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE."""
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds[:1] == ["Split"]:
        regex = parts[0].get("pattern", {}).get("Regex")
        if regex in PRE_BY_REGEX:
            return PRE_BY_REGEX[regex]
    log.warning("the tokenizer's pre-tokenizer %s has no llama.cpp name here: written as 'default', so llama.cpp "
                "may split text differently than transformers", kinds)
    return "default"
