from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import baseline

logs.to_file(snakemake.log[0])
baseline.run(
    config=snakemake.params.settings,
    harmful=snakemake.input.harmful,
    harmless=snakemake.input.harmless,
    out_responses=snakemake.output.responses,
    out_logprobs=snakemake.output.logprobs,
    out_metrics=snakemake.output.metrics,
    config_hash=snakemake.params.config_hash,
)
