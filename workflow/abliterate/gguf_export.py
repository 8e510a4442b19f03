"""A GGUF file of the merged model for llama.cpp, Ollama and LM Studio (``merge.gguf``).

Two ways, chosen by the source model (:func:`export`):

* a GGUF source (``model.gguf_file``) is copied with only the edited tensors replaced
  (:mod:`abliterate.gguf_patch`): its metadata and every other tensor keep their bytes, so a Q4_K_M
  model stays Q4_K_M except where the ablation changed it;
* a safetensors model is converted whole, tokenizer and chat template included
  (:mod:`abliterate.gguf_convert`).

This module holds what both share: the types the ``gguf`` package can write, HF ↔ GGUF tensor names
(gguf's own tensor map), llama.cpp's layout of a tensor, the atomic write and the facts a model card
reads back (:func:`describe`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from . import io
from .errors import ConfigError

log = logging.getLogger(__name__)

KEY = "merge.gguf"
WRITABLE = ("q8_0", "bf16", "f16", "f32")
FACTS = "gguf.json"  # beside the .gguf: its facts, since a GGUF source's metadata is kept byte for byte
# llama.cpp's converter permutes the Q/K rows of these architectures for its rotary layout
# (transformers undoes it on load); every other architecture stores them as the checkpoint does.
PERMUTED_QK = {"llama", "mistral", "deci", "granite", "granitemoe"}


def qtype(value: str | None):
    """``merge.gguf`` as the gguf package's type; None when no GGUF is asked for."""
    if value is None:
        return None
    from gguf import GGMLQuantizationType

    if value.lower() not in WRITABLE:
        raise ConfigError(
            f"{KEY}: {value!r} is not a type this workflow can write; choose one of {', '.join(WRITABLE)} "
            "(or null for no GGUF). K-quants such as Q4_K_M come only from llama.cpp's C quantizer: write "
            "f16 and run `llama-quantize model.gguf model-q4_k_m.gguf Q4_K_M`")
    return GGMLQuantizationType[value.upper()]


def output_path(out_dir: str | Path, run: str) -> Path:
    return Path(out_dir) / f"{run}.gguf"


def check_config(config) -> None:
    """What can be checked before any job runs (``workflow_config.check``)."""
    value = config["merge"].get("gguf")
    if value is None:
        return
    qtype(value)
    if config["merge"]["adapter_only"]:
        raise ConfigError(f"{KEY}: {value} needs the merged model, but merge.adapter_only is true; set one of "
                          "them back (merge.gguf: null or merge.adapter_only: false)")


def arch_of(name: str, key: str):
    """gguf's MODEL_ARCH for a GGUF architecture name."""
    from gguf import MODEL_ARCH_NAMES

    for arch, arch_name in MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ConfigError(f"{key}: the gguf package knows no architecture {name!r}; upgrade it (pip install -U gguf)")


def gguf_name(hf_name: str, arch_name: str, n_blocks: int, key: str) -> str:
    """``model.layers.3.self_attn.o_proj.weight`` → ``blk.3.attn_output.weight`` by gguf's tensor map."""
    from gguf import get_tensor_name_map

    base, _, suffix = hf_name.rpartition(".")
    mapped = get_tensor_name_map(arch_of(arch_name, key), n_blocks).get_name(base)
    if mapped is None:
        raise ConfigError(f"{key}: {hf_name} has no GGUF name in the gguf package's tensor map of {arch_name}; "
                          f"set {KEY}: null (the safetensors model in results/<run>/model is unaffected)")
    return f"{mapped}.{suffix}"


def to_gguf_layout(weight: np.ndarray, name: str, arch_name: str, heads: int, kv_heads: int) -> np.ndarray:
    """A checkpoint tensor (rows = outputs, as torch stores it: GGUF's dims are the reverse, so the
    bytes are the same) in llama.cpp's layout: Q/K rows interleaved per head where its converter does."""
    if arch_name not in PERMUTED_QK or not (".attn_q." in name or ".attn_k." in name):
        return weight
    n = heads if ".attn_q." in name else kv_heads
    return weight.reshape(n, 2, weight.shape[0] // n // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def encode(weight: np.ndarray, qt):
    """``weight`` (float32) in type ``qt`` and the type written. Vectors (norms, biases) stay float32 and
    matrices whose rows do not split into Q8_0 blocks fall back to float16, as llama.cpp's converter does."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import QuantError, quantize

    if weight.ndim < 2:
        return weight, T.F32
    try:
        return quantize(weight, qt), qt
    except QuantError:
        log.info("rows of %d values do not split into %s blocks: written as F16", weight.shape[-1], qt.name)
        return quantize(weight, T.F16), T.F16


def edited_tensors(adapter_dir: str | Path) -> list[str]:
    """The checkpoint tensors the exported adapter changes: LoRA targets and direct edits, by name."""
    from safetensors import safe_open

    from . import ablation
    from .streaming_merge import LORA_KEY

    adapter_dir = Path(adapter_dir)
    names = set()
    lora = adapter_dir / "adapter_model.safetensors"
    if lora.exists():
        with safe_open(lora, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                match = LORA_KEY.fullmatch(key)
                if match is None:
                    raise ConfigError(f"{KEY}: the adapter holds {key}, not a LoRA factor of a module's weight")
                names.add(f"{match.group(1)}.weight")
    direct = adapter_dir / ablation.DIRECT_EDITS_FILE
    if direct.exists():
        _, meta = io.load_safetensors(direct)
        names.update(f"{e['name']}.{e['param']}" for e in meta.get("direct_edits") or [])
    return sorted(names)


def export(model_dir: str | Path, adapter_dir: str | Path, out_path: str | Path, value: str,
           source_gguf: str | Path | None = None, metadata: dict | None = None) -> dict:
    """Write the merged model in ``model_dir`` as the GGUF file ``out_path`` in type ``value``
    (``merge.gguf``), from ``source_gguf`` when the model came from one, and its facts beside it."""
    from . import gguf_convert, gguf_patch

    qt = qtype(value)
    out_path = Path(out_path)
    start = time.perf_counter()
    if source_gguf is not None:
        facts = gguf_patch.patch(Path(source_gguf), Path(model_dir), edited_tensors(adapter_dir), out_path, qt)
    else:
        facts = gguf_convert.convert(Path(model_dir), out_path, qt)
    facts = {"path": str(out_path), "type": value.lower(), "bytes": out_path.stat().st_size,
             "source": str(source_gguf) if source_gguf else str(model_dir),
             "seconds": round(time.perf_counter() - start, 2), **facts, **(metadata or {})}
    io.write_json(facts, facts_path(out_path))
    log.info("wrote %s (%s, %.1f MiB) in %.1f s", out_path, facts["type"], facts["bytes"] / 2**20, facts["seconds"])
    return facts


def facts_path(gguf_path: str | Path) -> Path:
    return Path(gguf_path).with_name(FACTS)


def describe(gguf_path: str | Path) -> dict:
    """What a model card says about a written GGUF: its path, type (``merge.gguf``), size in bytes, the
    source it was made from (``"gguf"``: a patched copy of that file; ``"safetensors"``: converted), the
    tensors replaced, and the architecture."""
    return io.read_json(facts_path(gguf_path))
