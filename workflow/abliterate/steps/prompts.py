"""Rule `prompts`: fetch one prompt set, split it, write it as Parquet with its provenance."""

from __future__ import annotations

import logging

from .. import io, prompts

log = logging.getLogger(__name__)


def run(spec: dict, seed: int, name: str, out_table: str, config_hash: str) -> None:
    df, source = prompts.fetch(spec, seed, name)
    meta = {"set": name, "source": source, "sha256": io.sha256_texts(df["prompt"].tolist()), "seed": seed,
            "config_hash": config_hash}
    io.write_parquet(df, out_table, metadata=meta)
    log.info("wrote %s (%d prompts, sha256 %s) from %s", out_table, len(df), meta["sha256"][:12], source)
