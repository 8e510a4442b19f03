from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import prompts

logs.to_file(snakemake.log[0])
prompts.run(
    spec=snakemake.params.spec,
    seed=snakemake.params.seed,
    name=snakemake.wildcards.set,
    out_table=snakemake.output.table,
    config_hash=snakemake.params.config_hash,
)
