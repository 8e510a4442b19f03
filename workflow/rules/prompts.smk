# 1. Prompt sets: fetched once, cleaned, split (seeded, disjoint) into demo/train/eval/heldout.


rule prompts:
    output:
        table=f"{PROMPTS_DIR}/{{set}}.parquet",
    params:
        spec=lookup(dpath="prompts/{set}", within=config),
        seed=lookup(dpath="seed", within=config),
        config_hash=config_hash("prompts"),
    log:
        f"results/logs/prompts/{PROMPTS_KEY}/{{set}}.log",
    benchmark:
        f"results/benchmarks/prompts/{PROMPTS_KEY}/{{set}}.tsv"
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
