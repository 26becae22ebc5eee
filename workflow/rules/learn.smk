# Learning rules: train (task x model) -> predict -> annotate (write-back to AnnData).


rule train:
    input:
        raster=task_raster,
        cells=f"results/{DATASET}/cells.zarr",
    output:
        checkpoint=f"results/{DATASET}/models/{{task}}/{{model}}/checkpoint.pt",
        history=f"results/{DATASET}/models/{{task}}/{{model}}/history.tsv",
        metrics=f"results/{DATASET}/models/{{task}}/{{model}}/metrics.json",
    log:
        f"logs/train_{DATASET}_{{task}}_{{model}}.log",
    benchmark:
        f"logs/benchmarks/train_{DATASET}_{{task}}_{{model}}.tsv"
    threads: model_threads
    # Measured (docs/benchmarks.md, full-size run, 4.1 M cells, 2 cores): peak RSS 3.6-4.0 GB (networks; the kept
    # neighbourhood means add at most 1 GiB), 2.1 GB (baselines); 2.5-5 min per epoch of the 50 um sections on 2 CPU
    # cores: 1.6x margin on memory, runtime for 10 epochs on a CPU node with room to spare.
    resources:
        mem_mb=8000,
        runtime=720,
        gpu=config["training"]["gpus"],
    params:
        outdir=lambda wildcards, output: Path(output.checkpoint).parent,
        args=train_args,
    shell:
        "abc-pipeline train --raster {input.raster} --cells {input.cells} --task {wildcards.task} "
        "--model {wildcards.model} --out {params.outdir} {params.args} --restart-if-changed --no-progress > {log} 2>&1"


rule predict:
    input:
        checkpoint=rules.train.output.checkpoint,
        raster=task_raster,
        cells=f"results/{DATASET}/cells.zarr",
    output:
        directory(f"results/{DATASET}/models/{{task}}/{{model}}/predictions.zarr"),
    log:
        f"logs/predict_{DATASET}_{{task}}_{{model}}.log",
    benchmark:
        f"logs/benchmarks/predict_{DATASET}_{{task}}_{{model}}.tsv"
    threads: model_threads
    # Measured (full-size run): peak RSS 4.1 GB (networks), 2.3 GB (baselines); 10-16 min (networks) for every one
    # of the 4.1 M cells on 2 cores: 1.9x margin on memory, 15x on runtime.
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=config["training"]["gpus"],
    params:
        device=config["training"]["device"],
    shell:
        "abc-pipeline predict --checkpoint {input.checkpoint} --raster {input.raster} --cells {input.cells} "
        "--out {output} --device {params.device} --no-progress > {log} 2>&1"


rule annotate:
    input:
        cells=f"results/{DATASET}/cells.zarr",
        predictions=prediction_stores(),
    output:
        f"results/{DATASET}/cells_annotated.h5ad",
    log:
        f"logs/annotate_{DATASET}.log",
    benchmark:
        f"logs/benchmarks/annotate_{DATASET}.tsv"
    threads: 1
    # Measured (full-size run): 4.1 M cells, 8 models, X as CSR: 443 s wall, peak RSS 1.7 GB (one block of rows at a
    # time), an 8.3 GB h5ad: 1.8x margin on memory, 16x on runtime.
    resources:
        mem_mb=3000,
        runtime=120,
    shell:
        "abc-pipeline annotate --cells {input.cells} --predictions {input.predictions} --out {output} > {log} 2>&1"


rule evaluate:
    input:
        checkpoint=rules.train.output.checkpoint,
        predictions=rules.predict.output[0],
        raster=task_raster,
        cells=f"results/{DATASET}/cells.zarr",
    output:
        report(
            directory(f"results/{DATASET}/models/{{task}}/{{model}}/evaluation"),
            patterns=["{figure}.png"],
            caption="../report/evaluation.rst",
            category="Evaluation",
            subcategory="{task} / {model}",
        ),
    log:
        f"logs/evaluate_{DATASET}_{{task}}_{{model}}.log",
    benchmark:
        f"logs/benchmarks/evaluate_{DATASET}_{{task}}_{{model}}.tsv"
    threads: model_threads
    # Measured (full-size run): peak RSS 0.8-2.6 GB, 1-4 min per model (24 angles x 2 test sections) on 2 cores:
    # 1.5x margin on memory, 30x on runtime.
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=config["training"]["gpus"],
    params:
        device=config["training"]["device"],
        args=evaluate_args(),
    shell:
        "abc-pipeline evaluate --checkpoint {input.checkpoint} --raster {input.raster} "
        "--predictions {input.predictions} --cells {input.cells} --out {output} --device {params.device} "
        "{params.args} > {log} 2>&1"
