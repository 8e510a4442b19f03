"""A GGUF source model's file with only the ablated tensors replaced.

The header and every metadata key/value are copied as bytes; the tensor infos are written again
(a replaced tensor changes type, so every later offset moves); each unedited tensor's data is copied
from the source as bytes and each edited one comes from the merged model, in llama.cpp's layout, in
the chosen type. The file is written beside the output and moved over it at the end.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np

from . import gguf_export, io
from .errors import ConfigError

log = logging.getLogger(__name__)

SOURCE_KEY = "model.gguf_file"


def read(path: Path):
    """The source as gguf's reader sees it; a ConfigError naming ``model.gguf_file`` when it cannot."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader fails deep inside on a damaged file or an unknown type: one answer
        raise ConfigError(f"{SOURCE_KEY}: the gguf package cannot read {path} ({exc}), so merge.gguf cannot copy "
                          "it; install a newer gguf (pip install -U gguf) or set merge.gguf: null") from exc
    if reader.byte_order != "I":
        raise ConfigError(f"{SOURCE_KEY}: {path} is stored in the other byte order; set merge.gguf: null")
    return reader


def field(reader, key: str):
    value = reader.get_field(key)
    if value is None:
        raise ConfigError(f"{SOURCE_KEY}: the file has no {key}, which merge.gguf needs to name its tensors")
    return value.contents()


def _tensor_info(name: str, dims, ggml_type: int, offset: int) -> bytes:
    raw = name.encode("utf-8")
    return (struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset))


def _pad(n: int, align: int) -> int:
    return -n % align


def patch(source: Path, model_dir: Path, edited: list[str], out_path: Path, qt) -> dict:
    """Copy ``source`` to ``out_path`` with the tensors named ``edited`` (checkpoint names) taken from the
    merged model in ``model_dir`` and written in ``qt``."""
    from safetensors import safe_open

    reader = read(source)
    arch = field(reader, "general.architecture")
    n_blocks = int(field(reader, f"{arch}.block_count"))
    heads = int(field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(reader.get_field(f"{arch}.attention.head_count_kv").contents()
                   if reader.get_field(f"{arch}.attention.head_count_kv") else heads)
    tensors = {t.name: t for t in reader.tensors}
    files = _weight_files(model_dir)
    replaced: dict[str, tuple[np.ndarray, object]] = {}
    for hf_name in edited:
        name = gguf_export.gguf_name(hf_name, arch, n_blocks, gguf_export.KEY)
        if name not in tensors:
            raise ConfigError(f"{SOURCE_KEY}: the ablation edits {hf_name}, but {source.name} has no {name}; "
                              "set merge.gguf: null")
        if hf_name not in files:
            raise ConfigError(f"{gguf_export.KEY}: the merged model in {model_dir} has no {hf_name}")
        with safe_open(files[hf_name], framework="pt") as f:
            weight = f.get_tensor(hf_name)
        # the quantizers take float32 numpy arrays; the merged weight is float32 unless merge.dtype says otherwise
        weight = gguf_export.to_gguf_layout(weight.float().numpy(), name, arch, heads, kv_heads)
        if tuple(reversed(weight.shape)) != tuple(int(d) for d in tensors[name].shape):
            raise ConfigError(f"{SOURCE_KEY}: {name} is {tuple(tensors[name].shape)} in {source.name} (GGUF order) but "
                              f"{tuple(weight.shape)} in the merged model; was the study run on another model?")
        replaced[name] = gguf_export.encode(weight, qt)
    _write(reader, replaced, out_path)
    return {"source_kind": "gguf", "architecture": arch, "replaced": sorted(replaced),
            "source_bytes": source.stat().st_size}


def _weight_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_dir / v for k, v in io.read_json(index)["weight_map"].items()}
    from safetensors import safe_open

    single = model_dir / "model.safetensors"
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _write(reader, replaced: dict, out_path: Path) -> None:
    align = int(reader.alignment)
    infos, layout, offset = [], [], 0
    for t in reader.tensors:
        if t.name in replaced:
            data, ggml_type = replaced[t.name]
            blob = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        else:
            ggml_type = t.tensor_type
            blob = reader.data[t.data_offset:t.data_offset + t.n_bytes]
        infos.append(_tensor_info(t.name, [int(d) for d in t.shape], int(ggml_type), offset))
        layout.append(blob)
        offset += len(blob) + _pad(len(blob), align)
    head_end = reader.tensors[0].field.offset  # magic, version, counts and every key/value, as they are
    with io.atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        f.write(reader.data[:head_end])
        f.writelines(infos)
        f.write(b"\0" * _pad(f.tell(), align))
        for blob in layout:
            f.write(memoryview(blob))
            f.write(b"\0" * _pad(len(blob), align))
    log.info("copied %d tensors of the source as they are and replaced %d", len(infos) - len(replaced), len(replaced))
