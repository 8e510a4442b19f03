"""Rule `gguf_export`: the merged model as one GGUF file (``merge.gguf``)."""

from __future__ import annotations

from .. import gguf_export
from ..rule_settings import typed
from ..workflow_config import gguf_path, uses_demo_model


def run(config: dict, model_dir: str, adapter: str, out_gguf: str, config_hash: str) -> dict:
    config = typed("gguf_export", config)
    source = None if uses_demo_model(config) else gguf_path(config)
    return gguf_export.export(model_dir, adapter, out_gguf, config.merge.gguf, source_gguf=source,
                              metadata={"config_hash": config_hash})
