"""Rule `gguf_model`: a GGUF model converted once into a safetensors folder that every later job loads."""

from __future__ import annotations

from .. import loading


def run(config: dict, out_dir: str, config_hash: str) -> dict:
    source = loading.ModelSource.from_config(config["model"])
    return loading.convert_gguf(source, out_dir, {"config_hash": config_hash})
