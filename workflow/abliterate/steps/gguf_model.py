"""Rule `gguf_model`: a GGUF model converted once into a safetensors folder that every later job loads."""

from __future__ import annotations

from .. import loading, ram
from ..rule_settings import typed


def run(config: dict, out_dir: str, config_hash: str) -> dict:
    config = typed("gguf_model", config)
    source = loading.ModelSource.from_config(config.model)
    ram.check(ram.gguf_conversion_bytes(loading.load_config(source)), config.merge.max_ram_gib,
              "converting the GGUF model", "raise merge.max_ram_gib (the budget of every CPU job that holds "
              "the whole model) or run the workflow on a node with more RAM")
    return loading.convert_gguf(source, out_dir, {"config_hash": config_hash})
