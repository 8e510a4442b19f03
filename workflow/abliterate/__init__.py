"""abliterate: directional ablation of refusal behaviour, tuned by an Optuna study.

Every Snakemake rule of the workflow is a thin script over the modules of this package. Package
functions take and return plain values (tensors, lists, dicts, dataclasses) so they test on the CPU.
"""

__version__ = "0.1.0"
