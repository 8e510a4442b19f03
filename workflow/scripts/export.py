from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import export

logs.to_file(snakemake.log[0])
export.run(
    config=snakemake.params.settings,
    trials=snakemake.input.trials,
    harmful=snakemake.input.harmful,
    harmless=snakemake.input.harmless,
    directions_path=snakemake.input.directions,
    out_selected=snakemake.output.selected,
    out_pareto=snakemake.output.pareto,
    out_adapter=snakemake.output.adapter,
    out_plot=snakemake.output.plot,
    config_hash=snakemake.params.config_hash,
)
