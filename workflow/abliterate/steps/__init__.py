"""One module per workflow rule: each ``run`` function is the whole recipe of its rule.

Rule scripts only unpack ``snakemake`` into plain arguments and call ``run``; tests call the same
functions directly.
"""
