from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import merge

logs.to_file(snakemake.log[0])
merge.run(
    config=snakemake.params.settings,
    adapter=snakemake.input.adapter,
    selected_path=snakemake.input.selected,
    out_model=snakemake.output.model,
    config_hash=snakemake.params.config_hash,
)
