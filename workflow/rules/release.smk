# 9. Release: the folders users upload (adapter, merged model), each assembled anew under
#    results/<run>/release/ with a model card that reports the held-out figures of summary.json.
#    Hard links, not copies: no second copy of the weights on disk.


rule release:
    input:
        unpack(released_folders),
        summary=f"results/{RUN}/summary.json",
        selected=f"results/{RUN}/selected.json",
    output:
        release=directory(f"results/{RUN}/release"),
    params:
        settings=settings("release"),
        config_hash=config_hash("release"),
    log:
        f"results/logs/{RUN}/release.log",
    benchmark:
        f"results/benchmarks/{RUN}/release.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/abliterate-cpu.yaml"
    script:
        "../scripts/release.py"
