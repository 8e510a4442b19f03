# 1. Prompt sets: fetched once, cleaned, split (seeded, disjoint) into demo/train/eval/heldout.


rule prompts:
    output:
        table="results/prompts/{set}.parquet",
    params:
        spec=lookup(dpath="prompts/{set}", within=config),
        seed=lookup(dpath="seed", within=config),
        config_hash=config_hash("prompts"),
    log:
        "results/logs/prompts/{set}.log",
    benchmark:
        "results/benchmarks/prompts/{set}.tsv"
    wildcard_constraints:
        set="|".join(SETS),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/abliterate-cpu.yaml"
    script:
        "../scripts/prompts.py"
