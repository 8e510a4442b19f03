"""Load models and tokenizers the way users have them: a hub id, a local folder, or a GGUF file
(also one shipped inside an installed Python package; ``model_source`` resolves which).

Every decision (source, dtype, quantization, padding) is logged once. Bad input fails before any
weights are read, with a message naming the config key to change.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dtypes, hf_compat, quantization
from .devices import free_memory
from .errors import ModelLoadError
from .model_source import ModelSource, Resolved, resolve

log = logging.getLogger(__name__)

PROBE_PROMPT = "Write one sentence about the sea."


@contextlib.contextmanager
def _gguf_errors(res: Resolved):
    """A truncated or corrupt GGUF, or one whose model the installed transformers cannot read, fails
    deep inside the reader; say which file it was and what to do."""
    if not res.gguf_file:
        yield
        return
    try:
        yield
    except ModelLoadError:
        raise
    except (ValueError, NotImplementedError) as exc:
        if "not supported" not in str(exc) and "Unknown gguf model_type" not in str(exc):
            raise _corrupt_gguf(res, exc) from exc
        import transformers

        raise ModelLoadError(
            f"transformers {transformers.__version__} cannot read the model in GGUF file {res.description} "
            f"({exc}): install a transformers (and gguf) release that supports it, or set model.path to a "
            f"safetensors folder of the model"
        ) from exc
    except Exception as exc:  # any other reader failure means the same thing to the user
        raise _corrupt_gguf(res, exc) from exc


def _corrupt_gguf(res: Resolved, exc: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot read GGUF file {res.description}: it is truncated or corrupt "
                          f"({type(exc).__name__}: {exc}); re-download or re-install it")


@contextlib.contextmanager
def _remote_code_errors(key: str = "model.trust_remote_code"):
    """Translate transformers' remote-code refusal into an error that names our config key."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"this model needs custom code from its repository, which is not allowed by default. "
                f"Read that code, then set {key}: true in config.yaml to run it. ({str(exc).splitlines()[0]})"
            ) from exc
        raise


def pretrained_kwargs(res: Resolved, source: ModelSource) -> dict:
    """The ``from_pretrained`` arguments that say which model ``source`` is."""
    kwargs: dict = {"trust_remote_code": source.trust_remote_code}
    if res.gguf_file:
        kwargs["gguf_file"] = res.gguf_file
    if res.revision:
        kwargs["revision"] = res.revision
    return kwargs


def load_config(source: ModelSource):
    """The model's transformers config (a fresh copy each call; the file is read once per process
    while it stays the same file)."""
    res = resolve(source)
    return copy.deepcopy(_read_config(source, res, _file_stamp(res)))


def _file_stamp(res: Resolved) -> tuple | None:
    """What tells a local config file from the one read before at the same path: a process that
    replaces a model folder (a test, a notebook) must not be handed the old model's config."""
    if res.kind not in ("local", "gguf"):
        return None
    stat = (Path(res.location) / (res.gguf_file or "config.json")).stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _read_config(source: ModelSource, res: Resolved, stamp: tuple | None):
    # Cached because a GGUF file's metadata takes seconds to parse (12 s for Gemma 3 270M's 262k-token
    # vocabulary) and a job asks for the config more than once (merge: the card, the RAM estimate, the load).
    from transformers import AutoConfig

    with _gguf_errors(res), _remote_code_errors():
        try:
            return AutoConfig.from_pretrained(res.location, **pretrained_kwargs(res, source))
        except (OSError, KeyError) as exc:
            raise ModelLoadError(f"cannot read the model config of {res.description}: {exc}") from exc


def load_tokenizer(source: ModelSource, chat_template: str | None = None):
    """A tokenizer ready for batched generation: pad token set, left padding, a chat template."""
    from transformers import AutoTokenizer

    res = resolve(source)
    with _gguf_errors(res), _remote_code_errors():
        try:
            tok = AutoTokenizer.from_pretrained(res.location, **pretrained_kwargs(res, source))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the tokenizer of {res.description}: {exc}") from exc
    if chat_template:
        tok.chat_template = chat_template
        log.info("chat template taken from model.chat_template")
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(
            f"the tokenizer of {res.description} has no chat template; set model.chat_template in "
            "config.yaml to a Jinja chat template (abliteration prompts the model as a chat assistant)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token: using eos %r", tok.eos_token)
    # Left padding keeps every prompt's last token at position -1, where generation starts.
    tok.padding_side = "left"
    return tok


def convert_gguf(source: ModelSource, out_dir: str | Path, metadata: dict) -> dict:
    """Dequantise a GGUF model once into a safetensors folder (float32, with its tokenizer) that
    later jobs load in seconds: each GGUF load parses the file's metadata twice (config and tokenizer;
    12 s and 16 s for Gemma 3 270M's 262k-token vocabulary) and dequantises every tensor again."""
    from transformers import AutoTokenizer

    from . import io

    res = resolve(source)
    if res.kind != "gguf":
        raise ModelLoadError(f"{res.description} is not a GGUF file; nothing to convert")
    start = time.perf_counter()
    config = load_config(source)
    kwargs = pretrained_kwargs(res, source)
    with _gguf_errors(res):
        tokenizer = AutoTokenizer.from_pretrained(res.location, **kwargs)
        # float32: the blocks dequantise to it, and every dtype of the cascade is cast from it later
        model = _model_class(config).from_pretrained(res.location, **kwargs, dtype=torch.float32, config=config)
    drop_gguf_state(model)
    with io.atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        io.write_json({**metadata, "converted_from": res.description}, tmp / "abliterate.json")
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
    log.info("converted %s to %s once (float32, %.2f GiB) in %.1f s; later jobs load that folder",
             res.description, out_dir, size / 2**30, seconds)
    return {"seconds": round(seconds, 2), "bytes": size, "converted_from": res.description}


def drop_gguf_state(model) -> None:
    """A GGUF model is dequantised on load, but keeps a quantizer that forbids ``save_pretrained``."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        log.info("GGUF weights were dequantised on load; dropped the GGUF quantizer state so the model saves")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    dtype: torch.dtype
    quantization: str
    source: Resolved
    seconds: float

    def metadata(self) -> dict:
        return {"model": self.source.description, "model_kind": self.source.kind,
                "revision": self.source.revision or "", "dtype": str(self.dtype).removeprefix("torch."),
                "quantization": self.quantization}


def _probe(model, tokenizer) -> bool:
    """One short chat forward: do the logits stay finite in this dtype?"""
    messages = [{"role": "user", "content": PROBE_PROMPT}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=enc["input_ids"].to(device),
                       attention_mask=enc["attention_mask"].to(device)).logits
    return dtypes.is_finite(logits)


def _model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    return AutoModelForCausalLM


def load_model(source: ModelSource, device: torch.device,
               cascade: list[str] | tuple[str, ...] = dtypes.DEFAULT_CASCADE, quant: str = "none",
               cpu_half: bool = False, chat_template: str | None = None,
               device_map: str | dict | None = None) -> LoadedModel:
    """Load model and tokenizer, walking the dtype cascade until a probe forward is finite."""
    res = resolve(source)
    quantization.check_backend(quant, device)
    config = load_config(source)
    tokenizer = load_tokenizer(source, chat_template)
    auto = _model_class(config)
    kwargs = pretrained_kwargs(res, source)
    log.info("model %s (%s) on %s", res.description, res.kind, device)
    reasons = []
    for dtype, reason in dtypes.candidates(cascade, device, config, cpu_half):
        start = time.perf_counter()
        # the config read above, not parsed again (see _read_config); a copy, since loading sets fields on it
        load_kwargs = dict(kwargs, dtype=dtype, config=copy.deepcopy(config))
        bnb = quantization.bnb_config(quant, dtype)
        if bnb is not None:
            load_kwargs["quantization_config"] = bnb
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        elif bnb is not None or device.type != "cpu":
            # weights go straight to the accelerator, not through a full copy in RAM first
            load_kwargs["device_map"] = {"": (device.index or 0) if device.type == "cuda" else str(device)}
        with _gguf_errors(res), _remote_code_errors():
            try:
                model = auto.from_pretrained(res.location, **load_kwargs)
            except OSError as exc:
                raise ModelLoadError(f"cannot load the weights of {res.description}: {exc}") from exc
        drop_gguf_state(model)
        model.eval()
        model.requires_grad_(False)
        hf_compat.contiguous_output_inputs(model)
        weights_s = time.perf_counter() - start
        if _probe(model, tokenizer):
            seconds = time.perf_counter() - start
            log.info("loaded in %s (%s) in %.1f s (weights %.1f s, probe forward %.1f s)",
                     str(dtype).removeprefix("torch."), reason, seconds, weights_s, seconds - weights_s)
            return LoadedModel(model, tokenizer, dtype, quant, res, seconds)
        msg = f"{str(dtype).removeprefix('torch.')} gives non-finite logits (overflow)"
        reasons.append(msg)
        log.warning("%s; trying the next dtype of model.dtypes", msg)
        del model
        free_memory()
    raise ModelLoadError(f"{res.description} gives non-finite logits in every dtype of model.dtypes "
                         f"({'; '.join(reasons)}); add float32 to model.dtypes or check the weights")
