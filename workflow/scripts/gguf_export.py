from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import gguf_export

logs.to_file(snakemake.log[0])
gguf_export.run(
    config=snakemake.params.settings,
    model_dir=snakemake.input.model,
    adapter=snakemake.input.adapter,
    out_gguf=snakemake.output.gguf,
    config_hash=snakemake.params.config_hash,
)
