# 7b. With merge.gguf: the merged model as one GGUF file for llama.cpp, Ollama and LM Studio. A GGUF
#     source is copied with only the edited tensors replaced; other models are converted whole.


rule gguf_export:
    input:
        gguf_source,
        model=f"results/{RUN}/model",
        adapter=f"results/{RUN}/adapter",
    output:
        gguf=f"results/{RUN}/gguf/{RUN}.gguf",
        facts=f"results/{RUN}/gguf/gguf.json",
    params:
        settings=settings("gguf_export"),
        config_hash=config_hash("gguf_export"),
    log:
        f"results/logs/{RUN}/gguf_export.log",
    benchmark:
        f"results/benchmarks/{RUN}/gguf_export.tsv"
    threads: 2
    resources:
        mem_mb=MERGE_MEM_MB,
        runtime=60,
    conda:
        "../../envs/abliterate-cpu.yaml"
    script:
        "../scripts/gguf_export.py"
