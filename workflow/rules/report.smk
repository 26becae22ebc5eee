# Report: metrics table and overview figure; `snakemake --report report.html` embeds them.


rule report:
    input:
        annotated=f"results/{DATASET}/cells_annotated.h5ad",
        metrics=expand(f"results/{DATASET}/models/{{task}}/{{model}}/metrics.json", task=TASKS, model=MODELS),
        evaluations=expand(f"results/{DATASET}/models/{{task}}/{{model}}/evaluation", task=TASKS, model=MODELS),
    output:
        metrics=report(f"results/{DATASET}/report/metrics.tsv", caption="../report/metrics.rst", category="Metrics"),
        overview=report(
            f"results/{DATASET}/report/predictions_overview.png",
            caption="../report/overview.rst",
            category="Predictions",
        ),
        any_angle=report(
            f"results/{DATASET}/report/any_angle.png",
            caption="../report/any_angle.rst",
            category="Metrics",
        ),
    log:
        f"logs/report_{DATASET}.log",
    benchmark:
        f"logs/benchmarks/report_{DATASET}.tsv"
    threads: 1
    # Measured (full-size run, 4.1 M cells, 8 models): 48 s, peak RSS 1.5 GB (obs, uns and two sections' coordinates
    # of the h5ad; not X nor the probability tables): 2.7x margin on memory.
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        runs=lambda wildcards, input: [str(Path(m).parent) for m in input.metrics],
        outdir=lambda wildcards, output: Path(output.metrics).parent,
    shell:
        "abc-pipeline report --annotated {input.annotated} --runs {params.runs} --out {params.outdir} > {log} 2>&1"
