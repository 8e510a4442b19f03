"""Rule `directions`: residual streams of the train prompts and the per-layer refusal directions."""

from __future__ import annotations

import logging

from .. import devices, directions, io, residuals, session
from ..rule_settings import typed
from .common import resolve_batch_size

log = logging.getLogger(__name__)


def run(config: dict, harmful: str, harmless: str, out_directions: str, out_plot: str, config_hash: str) -> dict:
    config = typed("directions", config)
    lm = session.open_model(config)
    cfg = config.directions
    work = {name: session.chats(config, lm.tokenizer, table, "train")
            for name, table in (("harmful", harmful), ("harmless", harmless))}
    batch = resolve_batch_size(cfg.batch_size, lm, 1, [t for _, texts in work.values() for t in texts])
    res = {}
    hashes = {}
    for name, (raw, texts) in work.items():
        hashes[f"{name}_sha256"] = io.sha256_texts(raw)
        res[name] = residuals.collect_residuals(lm.model, lm.tokenizer, texts, batch)
        log.info("%s residuals: %s", name, tuple(res[name].shape))
    result = directions.compute_directions(res["harmful"], res["harmless"], orthogonalize=cfg.orthogonalize,
                                           winsorize_quantile=cfg.winsorize_quantile, n_directions=cfg.n_directions)
    tensors = {k: v for k, v in result.items() if hasattr(v, "shape")}
    meta = {**lm.metadata(), **hashes, "config_hash": config_hash, "n_harmful": len(res["harmful"]),
            "n_harmless": len(res["harmless"]), "orthogonalize": cfg.orthogonalize,
            "winsorize_quantile": cfg.winsorize_quantile, "n_directions": cfg.n_directions,
            "direction_sets": "(layers + 1, n_directions, hidden) orthonormal rows, row 0 = directions"}
    io.save_safetensors(tensors, out_directions, metadata=meta)
    directions.plot_directions(result, out_plot)
    del lm
    devices.free_memory()
    return meta
