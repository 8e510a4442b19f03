"""The merge written tensor by tensor from the checkpoint's own safetensors files.

Each saved tensor is read from the source folder (a local folder, the folder a GGUF model was
converted into, or the hub cache's snapshot at the pinned revision), cast as ``from_pretrained``
would cast it, edited with the adapter's LoRA factors or the direct-edit factors exactly as PEFT's
``merge_and_unload`` and :func:`abliterate.ablation.apply_saved_direct_edits` edit it, cast to
``merge.dtype``, written and freed. Untouched tensors are copied in chunks. The shards, their names,
their split and the index are those ``save_pretrained`` writes, so the folder equals the whole-model
merge's bit for bit; RAM stays near one edited matrix instead of the whole model.

:func:`plan` says whether a source streams; when it cannot (see its docstring), the caller falls back
to the whole-model merge and logs the reason.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import ablation, hf_compat, io
from .model_source import Resolved

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 2**20  # untouched tensors are copied (and cast) in pieces of this size
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


class NotStreamable(Exception):
    """Why a source cannot be merged tensor by tensor (the whole-model merge is used instead)."""


@dataclass
class Entry:
    """One tensor of a safetensors file: where its bytes are."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Edit:
    """What is added to one saved tensor: PEFT LoRA factors and/or direct-edit factors."""

    lora: tuple[torch.Tensor, torch.Tensor, float, bool] | None = None  # B, A, scaling, fan_in_fan_out
    direct: list[tuple[dict, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # entry, B, A


@dataclass
class Plan:
    """Everything the streaming merge writes, decided before a byte is written."""

    folder: Path  # the checkpoint's folder
    tensors: list[tuple[str, Entry, torch.dtype, torch.dtype]]  # saved name, source, loaded dtype, saved dtype
    edits: dict[str, Edit]  # by saved name
    model: torch.nn.Module  # on the meta device: config, generation config and parameter count come from it
    max_shard_size: int | str
    dtype: torch.dtype  # the merged model's ``dtype`` (its first floating parameter's), for config.json
    source: Resolved


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors of a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    start = 8 + n
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise NotStreamable(f"{path.name} holds {name} in {info['dtype']}, which this merge does not read")
        begin, end = info["data_offsets"]
        entries[name] = Entry(path, DTYPES[info["dtype"]], tuple(info["shape"]), start + begin, start + end)
    return entries


def checkpoint_files(res: Resolved) -> tuple[Path, dict[str, Entry]]:
    """The checkpoint's folder and every tensor in its safetensors files, without loading any."""
    if res.gguf_file:
        raise NotStreamable("a GGUF file must be dequantised (the workflow merges its converted folder)")
    if res.kind == "hub":
        from huggingface_hub import snapshot_download

        try:  # the cache's snapshot at the pinned revision (downloaded first unless the hub is switched off)
            folder = Path(snapshot_download(res.location, revision=res.revision,
                                            allow_patterns=["*.safetensors", "*.json"]))
        except Exception as exc:  # the whole-model merge then reports it as loading does
            raise NotStreamable(f"no snapshot of {res.description} ({type(exc).__name__}: {exc})") from exc
    else:
        folder = Path(res.location)
    if (folder / INDEX).is_file():
        names = sorted(set(io.read_json(folder / INDEX)["weight_map"].values()))
    elif (folder / SINGLE).is_file():
        names = [SINGLE]
    else:
        raise NotStreamable(f"{res.description} has no {SINGLE} or {INDEX} (only other weight formats)")
    entries: dict[str, Entry] = {}
    for name in names:
        entries.update(read_header(folder / name))
    return folder, entries


def _meta_model(config, dtype: torch.dtype, trust_remote_code: bool):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # as from_pretrained does: a tied weight is one tensor, saved once
    return model


def _edits(adapter_dir: Path, model) -> dict[str, Edit]:
    """The adapter folder's edits, keyed by model parameter name."""
    from transformers.pytorch_utils import Conv1D

    edits: dict[str, Edit] = {}
    if (adapter_dir / "adapter_config.json").exists():
        cfg = io.read_json(adapter_dir / "adapter_config.json")
        unsupported = [k for k in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "target_parameters",
                                   "layer_replication") if cfg.get(k)]
        if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
            raise NotStreamable(f"the adapter uses PEFT features this merge does not reproduce: {unsupported}")
        scaling = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
        tensors, _ = io.load_safetensors(adapter_dir / "adapter_model.safetensors")
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = LORA_KEY.fullmatch(key)
            if m is None:
                raise NotStreamable(f"the adapter holds {key}, not a LoRA factor of a module's weight")
            factors.setdefault(m.group(1), {})[m.group(2)] = t
        for name, ab in factors.items():
            module = model.get_submodule(name)
            if not isinstance(module, (torch.nn.Linear, Conv1D)):
                raise NotStreamable(f"LoRA targets {name}, a {type(module).__name__} (only Linear and Conv1D stream)")
            edits[f"{name}.weight"] = Edit(lora=(ab["B"], ab["A"], scaling, isinstance(module, Conv1D)))
    path = adapter_dir / ablation.DIRECT_EDITS_FILE
    if path.exists():
        tensors, meta = io.load_safetensors(path)
        for entry in meta.get("direct_edits") or []:
            edit = edits.setdefault(f"{entry['name']}.{entry['param']}", Edit())
            edit.direct.append((entry, tensors[f"{entry['key']}.lora_B"], tensors[f"{entry['key']}.lora_A"]))
    return edits


def plan(res: Resolved, config, adapter_dir: str | Path, dtype: torch.dtype, save_dtype: torch.dtype | None = None,
         trust_remote_code: bool = False, max_shard_size: int | str = "2GB") -> Plan:
    """What the streaming merge of ``adapter_dir`` into ``res`` writes; ``NotStreamable`` when it cannot
    reproduce the whole-model merge. ``dtype``: what the model is loaded and merged in; ``save_dtype``
    (``merge.dtype``): what every floating tensor is then cast to, None to keep them as loaded.

    Not streamable: a GGUF file (not yet dequantised), a checkpoint without safetensors
    files, a model whose checkpoint format transformers converts on load beyond renaming (fused MoE experts),
    a checkpoint whose tensors are not exactly the model's (missing, extra, other shapes), an edited
    weight that is tied to another, or adapter features the editors never write."""
    folder, entries = checkpoint_files(res)
    model = _meta_model(config, dtype, trust_remote_code)
    try:
        saved = hf_compat.saved_tensor_names(model)
        loaded = hf_compat.loaded_dtypes(model, dtype)
    except hf_compat.Unmirrored as exc:
        raise NotStreamable(str(exc)) from exc
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    tensors, used = [], set()
    for key, out in list(saved.items()):
        # a renaming is reverted on save only when loading used it: a checkpoint in the model's own names keeps them
        source = out if out in entries else key
        if source not in entries:
            raise NotStreamable(f"the checkpoint lacks {out}")
        out = saved[key] = source
        if entries[source].shape != shapes[key]:
            raise NotStreamable(f"{source} is {entries[source].shape} in the checkpoint, {shapes[key]} in the model")
        used.add(source)
        cast = save_dtype is not None and save_dtype != dtype and loaded[key].is_floating_point
        final = save_dtype if cast else loaded[key]
        tensors.append((out, entries[source], loaded[key], final))
    tied = set(model.state_dict()) - set(saved)
    extra = sorted(set(entries) - used - tied)
    if extra:
        raise NotStreamable(f"the checkpoint holds tensors the model does not load as they are: {extra[:3]}")
    edits = {}
    for key, edit in _edits(Path(adapter_dir), model).items():
        if key not in saved:
            raise NotStreamable(f"the edited weight {key} is tied to another or not saved")
        edits[saved[key]] = edit
    first = next(k for k, t in model.named_parameters() if t.is_floating_point())  # what model.dtype reads
    model_dtype = save_dtype if save_dtype is not None and save_dtype != dtype else loaded[first]
    return Plan(folder, tensors, edits, model, max_shard_size, model_dtype, res)


def _read(entry: Entry, begin: int = 0, end: int | None = None) -> torch.Tensor:
    """Bytes [begin, end) of a tensor (all of it by default), as a flat tensor of its dtype."""
    end = entry.end - entry.begin if end is None else end
    buf = torch.empty(end - begin, dtype=torch.uint8)
    with open(entry.file, "rb") as f:
        f.seek(entry.begin + begin)
        if f.readinto(buf.numpy()) != end - begin:
            raise OSError(f"{entry.file} is truncated")
    return buf.view(entry.dtype)


def _edited(entry: Entry, loaded: torch.dtype, edit: Edit) -> torch.Tensor:
    """The merged tensor, computed as PEFT's merge and ``apply_saved_direct_edits`` compute it."""
    w = _read(entry).reshape(entry.shape).to(loaded)
    with torch.no_grad():
        if edit.lora is not None:
            b, a, scaling, fan_in_fan_out = edit.lora
            # PEFT holds the factors in the base weight's dtype, upcast to float32 for half precision
            # (autocast_adapter_dtype), and adds B A (transposed for Conv1D) times the scaling in place
            lora_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
            delta = b.to(lora_dtype) @ a.to(lora_dtype)
            w += (delta.T if fan_in_fan_out else delta) * scaling
        for meta, b, a in edit.direct:
            ablation.add_saved_edit(w, meta, b, a)
    return w


def _write_shard(path: Path, items: list[tuple[str, Entry, torch.dtype, torch.dtype]], edits: dict[str, Edit]) -> None:
    """One safetensors file as ``safetensors.torch.save_file`` lays it out (tensors ordered by element size,
    then name; the header padded to 8 bytes), written tensor by tensor."""
    items = sorted(items, key=lambda it: (-it[3].itemsize, it[0]))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, entry, _, final in items:
        size = final.itemsize * math.prod(entry.shape)
        header[name] = {"dtype": NAMES[final], "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, entry, loaded, final in items:
            if name in edits:
                _write_tensor(f, _edited(entry, loaded, edits[name]).to(final))
                continue
            step = max(entry.dtype.itemsize, CHUNK_BYTES // entry.dtype.itemsize * entry.dtype.itemsize)
            for begin in range(0, entry.end - entry.begin, step):
                chunk = _read(entry, begin, min(begin + step, entry.end - entry.begin))
                _write_tensor(f, chunk.to(loaded).to(final))


def _write_tensor(f, t: torch.Tensor) -> None:
    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write(p: Plan, out: Path) -> None:
    """The merged weights, config and generation config into folder ``out`` (the tokenizer, card and
    metadata are the caller's)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    shapes = {name: torch.empty(entry.shape, dtype=final, device="meta") for name, entry, _, final in p.tensors}
    split = split_torch_state_dict_into_shards(shapes, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=p.max_shard_size)
    by_name = {t[0]: t for t in p.tensors}
    for file, names in split.filename_to_tensors.items():
        _write_shard(out / file, [by_name[n] for n in names], p.edits)
    if split.is_sharded:
        index = {"metadata": {"total_parameters": p.model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_configs(p, out)
    log.info("streamed %d tensors (%d edited) into %d file(s)", len(p.tensors), len(p.edits),
             len(split.filename_to_tensors))


def _write_configs(p: Plan, out: Path) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them for the merged model."""
    model = p.model
    model.config.dtype = str(p.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    if model.can_generate():
        from transformers import GenerationConfig

        # as from_pretrained finds it: the checkpoint's generation_config.json, else one made from config.json
        try:
            generation = GenerationConfig.from_pretrained(p.folder, _from_auto=True)
        except OSError:
            generation = GenerationConfig.from_pretrained(p.folder, config_file_name="config.json",
                                                          _from_auto=True, _from_model_config=True)
        generation.save_pretrained(out)


# Python, torch, transformers, the tokenizer and the meta-device model; measured peaks are in benchmarks/README.md
OVERHEAD_BYTES = 2**30


def ram_bytes(p: Plan) -> int:
    """RAM the streaming merge needs: the fixed overhead, plus the largest working set of one tensor: an
    edited one read, loaded, its delta (float32, or wider) and the sum or transpose, saved; an untouched
    one is a chunk read and cast to the loaded and saved dtypes."""
    work = 0
    for name, entry, loaded, final in p.tensors:
        n = math.prod(entry.shape)
        if name in p.edits:
            delta = max(4, loaded.itemsize)
            work = max(work, n * (entry.dtype.itemsize + loaded.itemsize + 2 * delta + final.itemsize))
        else:
            n = min(n, CHUNK_BYTES // entry.dtype.itemsize)
            work = max(work, n * (entry.dtype.itemsize + loaded.itemsize + final.itemsize))
    return OVERHEAD_BYTES + work


def output_bytes(p: Plan) -> int:
    """Size of the merged weights."""
    return sum(math.prod(entry.shape) * final.itemsize for _, entry, _, final in p.tensors)
