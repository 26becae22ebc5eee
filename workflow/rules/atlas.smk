# Atlas rules: synthetic release (demo only) -> download -> assemble.


if SYNTHETIC:

    rule synth:
        output:
            manifest=f"{SYNTH_ROOT}/releases/{RELEASE}/manifest.json",
        log:
            "logs/synth.log",
        benchmark:
            "logs/benchmarks/synth.tsv"
        params:
            cells=config["source"]["synthetic"]["cells"],
            seed=config["source"]["synthetic"]["seed"],
            sections=config["source"]["synthetic"]["sections"],
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        shell:
            "abc-pipeline synth --out {SYNTH_ROOT} --release {RELEASE} --cells {params.cells} "
            "--seed {params.seed} --sections {params.sections} > {log} 2>&1"


rule download:
    input:
        f"{SYNTH_ROOT}/releases/{RELEASE}/manifest.json" if SYNTHETIC else [],
    output:
        summary=f"{CACHE}/releases/{RELEASE}/{DATASET}.download.json",
    log:
        f"logs/download_{DATASET}.log",
    benchmark:
        f"logs/benchmarks/download_{DATASET}.tsv"
    params:
        base_url=base_url(),
        jobs=config["download"]["jobs"],
        retries=config["download"]["retries"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=600,
    shell:
        "abc-pipeline download --dataset {DATASET} --release {RELEASE} --base-url {params.base_url} "
        "--cache {CACHE} --jobs {params.jobs} --retries {params.retries} --summary {output.summary} "
        "--no-progress > {log} 2>&1"


rule assemble:
    input:
        rules.download.output.summary,
    output:
        directory(f"results/{DATASET}/cells.zarr"),
    log:
        f"logs/assemble_{DATASET}.log",
    benchmark:
        f"logs/benchmarks/assemble_{DATASET}.tsv"
    params:
        chunk_cells=config["assemble"]["chunk_cells"],
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
    shell:
        "abc-pipeline assemble --dataset {DATASET} --release {RELEASE} --cache {CACHE} --out {output} "
        "--chunk-cells {params.chunk_cells} --no-progress > {log} 2>&1"
