"""Refusal directions from only the harmful train prompts the base model refuses (Arditi et al.'s filter).

Arditi et al. (2024) keep, for the difference of means, only the harmful prompts the model actually
refuses; Heretic and our ``directions`` rule use every harmful train prompt. On Qwen2.5-Coder-0.5B
about a quarter of the harmful train prompts are refused, so the mean over all of them mixes the
refusal direction with whatever separates "harmful topic" from "harmless topic" in prompts the model
answers anyway. Whether the filtered direction makes a better edit is measured before any of it goes
into the workflow: this script prepares a working folder whose study runs on filtered directions,
and ``compare.py`` then runs the rest of our workflow in it unchanged.

    python benchmarks/refused_directions.py --seed 42 --from benchmarks/work/cpu-real-seed42 \
        --work benchmarks/work/cpu-real-seed42-refused
    python benchmarks/compare.py --protocol cpu-real --seed 42 --no-judge --reuse-heretic \
        --work benchmarks/work/cpu-real-seed42-refused --out ...

``--from`` is a finished ``compare.py --protocol cpu-real --seed N`` working folder: the new one gets
hard links to its prompt pools, Heretic's run and the held-out cache (read, never rewritten), and our
workflow is run in it up to the directions rule, as ``compare.py`` would. The base model then answers
the harmful train prompts with the study's own verdict (``evaluation.max_new_tokens``, markers,
batch), and ``directions.safetensors`` is rewritten from the residuals of the refused ones against
all harmless train prompts, with the run's other direction settings and its metadata, which records
the filter. The study and every rule after it then run on the filtered directions (Snakemake runs
them in ``compare.py``); the baseline and the export's confirmation on all train prompts are as in
the shipped workflow. Writes ``refused-directions.json`` (the filter's counts, per-row cosine to the
unfiltered directions) into ``--work``.

The decision rule, fixed before the first run (as for the orthogonalised directions): the filter goes
into the workflow as a ``directions`` option only if, pooled over cpu-real seeds 42-45 and paired on
the same held-out prompts against our shipped defaults (the ``-read`` result files of 2026-12-06), it
refuses no more (markers within 48 tokens) at a first-token KL interval below zero, or fewer with
p < 0.05 at a KL not higher (``benchmarks/versus.py``). Otherwise the measurement and its reason go
into benchmarks/README.md and the workflow stays as it is.

Adopted (benchmarks/README.md, "Directions from the refused prompts"): the workflow's
``directions.refused_only`` makes these directions itself, bit for bit; it is on in the real-model
configs and in compare.py's real-model protocols, off for the demo model. This script stays as the
record of how the measurement was made.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS.parent / "workflow"))

log = logging.getLogger("refused_directions")


def prepare(source: Path, work: Path, protocol_name: str, seed: int, run: str) -> Path:
    """The new working folder: the source's prompt pools, Heretic's run and the held-out cache
    hard-linked (read, never rewritten), our config written as ``compare.py`` writes it, and our
    workflow run up to its directions (a new folder is a new prompt path, so a new fingerprint)."""
    from dataclasses import replace

    import compare

    if work.exists():
        raise SystemExit(f"{work} exists: remove it or choose another --work")
    work.mkdir(parents=True)
    for name in ("prompts", "heretic", "heldout-cache"):
        if (source / name).exists():
            shutil.copytree(source / name, work / name, copy_function=os.link)
    for name in ("heretic-job.json", "heretic-measured.json"):
        if (source / name).exists():
            os.link(source / name, work / name)
    protocol = replace(compare.PROTOCOLS[protocol_name], seed=seed)
    if protocol.real_model:
        compare.converted_real_model(protocol)
    ours = compare.prepare_ours(protocol, protocol.model, work, run)
    compare.run_measured(compare.snakemake_cmd(ours, protocol.threads, f"results/{run}/directions.safetensors"),
                         cwd=ours, log=work / "logs" / "ours-directions.log", env=compare.child_env(protocol.threads))
    return ours


def filtered_directions(ours: Path, run: str) -> dict:
    import yaml

    from abliterate import devices, directions, io, residuals, session
    from abliterate.evaluation import measure
    from abliterate.rule_settings import settings as rule_slice, typed
    from abliterate.steps.common import eval_settings, resolve_batch_size

    os.chdir(ours)  # the config's relative paths (results/...) are the workflow's, from its folder
    config = yaml.safe_load(Path("config.yaml").read_text())
    tables = sorted(Path("results/prompts").glob("*/harmful.parquet"))
    if len(tables) != 1:
        raise SystemExit(f"expected one results/prompts/*/harmful.parquet in {ours}, found {len(tables)}")
    harmful, harmless = str(tables[0]), str(tables[0].with_name("harmless.parquet"))
    base = typed("baseline", rule_slice(config, "baseline"))
    cfg = typed("directions", rule_slice(config, "directions")).directions
    lm = session.open_model(base)
    raw, texts = session.chats(base, lm.tokenizer, harmful, "train")
    settings = eval_settings(base.evaluation, lm, texts)
    found = measure(lm.model, lm.tokenizer, settings, harmful=texts, progress=True)
    refused = [t for t, r in zip(texts, found.refused) if r]
    log.info("the base model refuses %d of %d harmful train prompts within %d tokens", len(refused), len(texts),
             base.evaluation.max_new_tokens)
    if len(refused) < 2:
        raise SystemExit("fewer than two refused train prompts: no direction to take from them")
    _, harmless_texts = session.chats(base, lm.tokenizer, harmless, "train")
    batch = resolve_batch_size(cfg.batch_size, lm, 1, refused + harmless_texts)
    res_harmful = residuals.collect_residuals(lm.model, lm.tokenizer, refused, batch)
    res_harmless = residuals.collect_residuals(lm.model, lm.tokenizer, harmless_texts, batch)
    result = directions.compute_directions(res_harmful, res_harmless, orthogonalize=cfg.orthogonalize,
                                           winsorize_quantile=cfg.winsorize_quantile, n_directions=cfg.n_directions)
    path = Path("results") / run / "directions.safetensors"
    old, meta = io.load_safetensors(path)
    cosine = (result["directions"].double() * old["directions"].double()).sum(dim=-1)
    refused_raw = [p for p, r in zip(raw, found.refused) if r]
    meta = {**meta, "harmful_filter": "refused by the base model within evaluation.max_new_tokens (benchmarks/"
            "refused_directions.py)", "n_harmful": len(refused), "harmful_sha256": io.sha256_texts(refused_raw)}
    io.save_safetensors({k: v for k, v in result.items() if hasattr(v, "shape")}, path, metadata=meta)
    directions.plot_directions(result, Path("results") / run / "plots" / "directions.png")
    del lm
    devices.free_memory()
    return {"n_train_harmful": len(texts), "n_refused": len(refused), "max_new_tokens": base.evaluation.max_new_tokens,
            "refused_prompts_sha256": io.sha256_texts(refused_raw),
            "cosine_to_unfiltered_per_row": [round(float(c), 4) for c in cosine.cpu().tolist()]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", type=Path, required=True, help="a finished cpu-real working folder")
    ap.add_argument("--work", type=Path, required=True, help="the new working folder (must not exist)")
    ap.add_argument("--protocol", default="cpu-real")
    ap.add_argument("--seed", type=int, required=True, help="the source folder's seed")
    args = ap.parse_args(argv)
    run = f"bench-{args.protocol}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    work = args.work.resolve()
    ours = prepare(args.source.resolve(), work, args.protocol, args.seed, run)
    from abliterate import io

    figures = {"source": str(args.source), **filtered_directions(ours, run)}
    io.write_json(figures, work / "refused-directions.json")
    log.info("wrote %s: %s", work / "refused-directions.json", {k: figures[k] for k in ("n_refused", "n_train_harmful")})


if __name__ == "__main__":
    main()
