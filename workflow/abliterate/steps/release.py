"""Rule `release`: the folders users upload (adapter, merged model, GGUF), each with a model card that
reports the held-out figures.

The figures exist only once `evaluate` has run, after export and merge wrote those folders; a rule
must not change another rule's output afterwards, so this one assembles ``results/<run>/release/``
anew: each folder's files hard-linked (copied where the file system cannot link), its README.md the
card of :mod:`abliterate.model_card`. Snakemake's directory timestamp lands in ``release/`` itself,
not in the folders, so each uploads as it is.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .. import io, model_card
from ..model_source import HUB_ID, ModelSource, resolve
from ..rule_settings import typed

log = logging.getLogger(__name__)

# Written by Snakemake into every directory() output, and replaced here by the card.
SKIPPED = {".snakemake_timestamp", "README.md"}
# folder name under release/ -> the card's kind
FOLDER_KINDS = {"adapter": "adapter", "model": "merged", "gguf": "gguf"}


def link_or_copy(src: Path, dest: Path) -> None:
    """A hard link (no second copy of the weights on disk), else a copy. The merge and export rules
    replace their folders rather than write into the files, so a link never sees a rewrite."""
    try:
        os.link(src, dest)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dest)


def facts(config, model: str) -> model_card.CardFacts:
    """What the cards say beyond selected.json and summary.json, from the rule's settings."""
    source = ModelSource.from_config(config.model)
    res = resolve(source)
    licence = model_card.source_licence(res)
    log.info("licence of %s: %s (%s)", res.description, licence.id or "unknown", licence.source)
    base = source.path if res.kind == "hub" and HUB_ID.fullmatch(source.path) else None
    return model_card.CardFacts(run=config.run, model=model, base_model=base, licence=licence, seed=config.seed,
                                policy=config.export.policy, refusal_target=config.export.refusal_target,
                                confirm=config.export.confirm, trial=config.export.trial)


def run(config: dict, folders: dict[str, str], summary_path: str, selected_path: str, out_dir: str,
        config_hash: str) -> dict:
    """Assemble ``out_dir/<name>/`` for each of ``folders`` (name: ``adapter``, ``model``, ``gguf``)."""
    config = typed("release", config)
    summary, selected = io.read_json(summary_path), io.read_json(selected_path)
    card_facts = facts(config, summary.get("model") or selected.get("model") or config.model.path)
    record: dict = {"config_hash": config_hash, "licence": card_facts.licence.id,
                    "licence_source": card_facts.licence.source, "folders": {}}
    with io.atomic_dir(out_dir) as tmp:
        for name, src in folders.items():
            kind = FOLDER_KINDS[name]
            dest = tmp / name
            dest.mkdir()
            files = sorted(p for p in Path(src).rglob("*") if p.is_file() and p.name not in SKIPPED)
            for f in files:
                target = dest / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(f, target)
            (dest / "README.md").write_text(model_card.render(kind, selected, summary, card_facts))
            record["folders"][name] = {"kind": kind, "from": str(src),
                                       "files": [str(f.relative_to(src)) for f in files] + ["README.md"]}
            log.info("release/%s: %d files from %s and its model card", name, len(files), src)
        # beside the folders, not in them: what users upload stays the model's own files
        io.write_json(record, tmp / "release.json")
    return record
