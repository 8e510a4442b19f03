from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import directions

logs.to_file(snakemake.log[0])
directions.run(
    config=snakemake.params.settings,
    harmful=snakemake.input.harmful,
    harmless=snakemake.input.harmless,
    out_directions=snakemake.output.directions,
    out_plot=snakemake.output.plot,
    config_hash=snakemake.params.config_hash,
)
