"""Rule `demo_model`: build the offline demo model (a refusing SmolLM2) from its demo split."""

from __future__ import annotations

import logging

import torch

from .. import demo_model, loading, prompts, refusal, session
from ..errors import PromptError
from ..rule_settings import typed

log = logging.getLogger(__name__)


def refusal_targets(harmful_spec, demo_prompts: list[str]) -> list[dict]:
    """Pair each demo prompt with the refusal its source ships (uncensorbench's censored_response)."""
    raw, source = prompts.read_source(harmful_spec, "harmful")
    column = harmful_spec["column"]
    if "censored_response" not in raw.columns:
        raise PromptError(f"the demo model needs harmful prompts with a `censored_response` column (as "
                          f"uncensorbench ships); {source} has columns {list(raw.columns)}")
    lookup = dict(zip(raw[column].astype(str).str.strip(), raw["censored_response"].astype(str)))
    return [{"prompt": p, "censored_response": lookup[p]} for p in demo_prompts]


def run(config: dict, harmful: str, harmless: str, out_dir: str, threads: int, config_hash: str) -> dict:
    torch.set_num_threads(max(1, threads))
    config = typed("demo_model", config)
    cfg = config.demo_model
    # Check everything cheap before the minutes of training start.
    harmful_demo = refusal_targets(config.prompts.harmful, session.read_split(harmful, "demo"))
    harmless_demo = session.read_split(harmless, "demo")
    check_harmful = session.read_split(harmful, "eval")
    check_harmless = session.read_split(harmless, "eval")
    source = loading.ModelSource(path="", package=cfg.package, gguf_file=cfg.gguf_file)
    lm = loading.load_model(source, torch.device("cpu"), cascade=["float32"])
    lm.model.requires_grad_(True)
    recipe = demo_model.recipe_from_config(cfg)
    detector = refusal.RefusalDetector(config.evaluation.markers or refusal.DEFAULT_MARKERS)
    model, metrics = demo_model.build_demo_model(
        lm.model, lm.tokenizer, harmful_demo, harmless_demo, recipe, check_harmful, check_harmless,
        min_refusal=cfg.min_refusal, max_harmless_refusal=cfg.max_harmless_refusal, detector=detector)
    metadata = {**metrics, "base_model": lm.source.description, "config_hash": config_hash}
    demo_model.save_demo_model(model, lm.tokenizer, out_dir, metadata)
    return metadata
