from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import demo

logs.to_file(snakemake.log[0])
demo.run(
    config=snakemake.params.settings,
    harmful=snakemake.input.harmful,
    harmless=snakemake.input.harmless,
    out_dir=snakemake.output.model,
    threads=snakemake.threads,
    config_hash=snakemake.params.config_hash,
)
