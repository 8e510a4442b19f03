"""Rule `directions`: residual streams of the train prompts and the per-layer refusal directions."""

from __future__ import annotations

import logging

from .. import devices, directions, io, residuals, session
from ..evaluation import measure
from ..rule_settings import typed
from .common import eval_settings, resolve_batch_size

log = logging.getLogger(__name__)

# Below this many refused prompts the harmful mean of directions.refused_only rests on too few
# residuals to trust (a warning, not an error: the study still measures what the edit does).
FEW_REFUSED = 10


def refused_prompts(config, lm, raw: list[str], texts: list[str]) -> tuple[list[str], list[str], str]:
    """The harmful train prompts the unmodified model refuses, by the study's verdict, and what was
    kept: ``refused``, or ``all`` when it refuses none (a difference of means needs prompts)."""
    found = measure(lm.model, lm.tokenizer, eval_settings(config.evaluation, lm, texts), harmful=texts,
                    progress=True)
    keep = [i for i, refused in enumerate(found.refused) if refused]
    log.info("directions.refused_only: the unmodified model refuses %d of %d harmful train prompts within %d "
             "tokens", len(keep), len(texts), config.evaluation.max_new_tokens)
    if not keep:
        log.warning("directions.refused_only: the unmodified model refuses none of the %d harmful train prompts "
                    "(a model never taught to refuse, or refusals worded in a way evaluation.markers misses): "
                    "the directions come from all of them", len(texts))
        return raw, texts, "all"
    if len(keep) < FEW_REFUSED:
        log.warning("directions.refused_only: the harmful mean rests on the %d refused prompt(s) alone; more "
                    "train prompts (prompts.harmful.max.train) give a steadier direction", len(keep))
    return [raw[i] for i in keep], [texts[i] for i in keep], "refused"


def run(config: dict, harmful: str, harmless: str, out_directions: str, out_plot: str, config_hash: str) -> dict:
    config = typed("directions", config)
    lm = session.open_model(config)
    cfg = config.directions
    work = {name: session.chats(config, lm.tokenizer, table, "train")
            for name, table in (("harmful", harmful), ("harmless", harmless))}
    hashes = {f"{name}_sha256": io.sha256_texts(raw) for name, (raw, _) in work.items()}
    used = {"n_harmful_train": len(work["harmful"][0])}
    if cfg.refused_only:
        raw, texts, kept = refused_prompts(config, lm, *work["harmful"])
        work["harmful"] = (raw, texts)
        used |= {"harmful_kept": kept, "kept_sha256": io.sha256_texts(raw)}
    batch = resolve_batch_size(cfg.batch_size, lm, 1, [t for _, texts in work.values() for t in texts])
    res = {}
    for name, (_, texts) in work.items():
        res[name] = residuals.collect_residuals(lm.model, lm.tokenizer, texts, batch)
        log.info("%s residuals: %s", name, tuple(res[name].shape))
    result = directions.compute_directions(res["harmful"], res["harmless"], orthogonalize=cfg.orthogonalize,
                                           winsorize_quantile=cfg.winsorize_quantile, n_directions=cfg.n_directions)
    tensors = {k: v for k, v in result.items() if hasattr(v, "shape")}
    meta = {**lm.metadata(), **hashes, "config_hash": config_hash, "n_harmful": len(res["harmful"]),
            "n_harmless": len(res["harmless"]), "orthogonalize": cfg.orthogonalize,
            "refused_only": cfg.refused_only, **used,
            "winsorize_quantile": cfg.winsorize_quantile, "n_directions": cfg.n_directions,
            "direction_sets": "(layers + 1, n_directions, hidden) orthonormal rows, row 0 = directions"}
    io.save_safetensors(tensors, out_directions, metadata=meta)
    directions.plot_directions(result, out_plot)
    del lm
    devices.free_memory()
    return meta
