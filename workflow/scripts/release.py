from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import release

logs.to_file(snakemake.log[0])
release.run(
    config=snakemake.params.settings,
    # the GGUF rule declares its file, not its folder; the folder is what users take
    folders={name: str(Path(path).parent) if name == "gguf" else path
             for name in release.FOLDER_KINDS if (path := snakemake.input.get(name))},
    summary_path=snakemake.input.summary,
    selected_path=snakemake.input.selected,
    out_dir=snakemake.output.release,
    config_hash=snakemake.params.config_hash,
)
