from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import study

logs.to_file(snakemake.log[0])
study.write_trials(snakemake.params.storage, snakemake.params.study_name, snakemake.output.table,
                   snakemake.params.ledger)
