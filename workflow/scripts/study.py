from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import study

logs.to_file(snakemake.log[0])
study.run(
    config=snakemake.params.settings,
    worker=int(snakemake.wildcards.worker),
    harmful=snakemake.input.harmful,
    harmless=snakemake.input.harmless,
    directions_path=snakemake.input.directions,
    baseline_path=snakemake.input.baseline,
    storage=snakemake.params.storage,
    study_name=snakemake.params.study_name,
    ledger=snakemake.params.ledger,
    n_trials=snakemake.params.n_trials,
    out_done=snakemake.output.done,
    config_hash=snakemake.params.config_hash,
)
