"""What every GPU step starts with: the configured model on the chosen device, and prompt texts.

Kept apart from the steps so that each step module reads as the recipe of its rule.
"""

from __future__ import annotations

import logging

import pandas as pd

from . import devices, loading, prompting, workflow_config
from .errors import PromptError

log = logging.getLogger(__name__)


def model_source(settings, path: str | None = None) -> loading.ModelSource:
    """The configured model (a GGUF file: its converted folder), or (``path``) a folder this workflow
    wrote, such as the merged model. ``settings``: a rule's (:mod:`abliterate.rule_settings`)."""
    if path is not None:
        return loading.ModelSource(path=path, trust_remote_code=settings.model.trust_remote_code)
    configured = loading.ModelSource.from_config(settings.model)
    converted = workflow_config.converted_model_dir(settings)
    if converted is None:
        return configured
    # a GGUF model is read from the folder the gguf_model rule converted it into, under its own name
    return loading.ModelSource(path=converted, trust_remote_code=configured.trust_remote_code,
                               label=loading.resolve(configured).description)


def open_model(settings, path: str | None = None, device=None, quantization: str | None = None) -> loading.LoadedModel:
    model = settings.model
    quant = model.quantization if quantization is None else quantization
    source = model_source(settings, path)
    if quant != "none" and source.label:  # a GGUF model, read from its converted folder
        log.warning("%s holds GGUF-quantized weights; %s rounds their dequantised copy a second time, adding "
                    "its error to the file's", source.label, quant)
    # a folder this workflow wrote carries the template in its tokenizer (the merge saved it there)
    template = None if path else workflow_config.chat_template(model.chat_template)
    return loading.load_model(source, device or devices.get_device(), cascade=model.dtypes, quant=quant,
                              cpu_half=model.cpu_half, chat_template=template, device_map=model.device_map)


def read_split(table_path: str, split: str) -> list[str]:
    df = pd.read_parquet(table_path)
    texts = df.loc[df["split"] == split, "prompt"].tolist()
    if not texts:
        raise PromptError(f"{table_path} has no prompts in split {split!r}; check prompts.*.splits in config.yaml")
    return texts


def chats(settings, tokenizer, table_path: str, split: str) -> tuple[list[str], list[str]]:
    """``(raw prompts, chat-formatted texts)`` of one split."""
    raw = read_split(table_path, split)
    return raw, prompting.chat_texts(tokenizer, raw, settings.model.system_prompt)

