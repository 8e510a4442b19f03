# 2b. A GGUF model (model.gguf_file or a .gguf model.path) is dequantised once into a safetensors
#     folder; every later job loads that folder instead of parsing and dequantising the file again.


rule gguf_model:
    input:
        gguf=gguf_input,
    output:
        model=directory(f"results/{RUN}/base_model"),
    params:
        settings=settings("gguf_model"),
        config_hash=config_hash("gguf_model"),
    log:
        f"results/logs/{RUN}/gguf_model.log",
    benchmark:
        f"results/benchmarks/{RUN}/gguf_model.tsv"
    threads: 4
    resources:
        mem_mb=MERGE_MEM_MB,
        runtime=60,
    conda:
        "../../envs/abliterate-cpu.yaml"
    script:
        "../scripts/gguf_model.py"
