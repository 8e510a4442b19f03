from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import gguf_model

logs.to_file(snakemake.log[0])
gguf_model.run(
    config=snakemake.params.settings,
    out_dir=snakemake.output.model,
    config_hash=snakemake.params.config_hash,
)
