# Atlas rules: synthetic release (demo only) -> download -> assemble; or your own data -> import.


if SYNTHETIC:

    rule synth:
        output:
            manifest=f"{SYNTH_ROOT}/releases/{RELEASE}/manifest.json",
        log:
            "logs/synth.log",
        benchmark:
            "logs/benchmarks/synth.tsv"
        threads: 1
        # Measured (docs/benchmarks.md): peak RSS 1.33 GB at 1 M cells, flat in the cell count (set by the 200,000-
        # cell chunk): 3x margin. ~60 CPU-s per million cells; 4.3 M cells took > 30 min on a busy 2-core node.
        resources:
            mem_mb=4000,
            runtime=90,
        params:
            root=lambda wildcards, output: Path(output.manifest).parents[2],
            release=RELEASE,
            cells=config["source"]["synthetic"]["cells"],
            seed=config["source"]["synthetic"]["seed"],
            sections=config["source"]["synthetic"]["sections"],
        shell:
            "abc-pipeline synth --out {params.root} --release {params.release} --cells {params.cells} "
            "--seed {params.seed} --sections {params.sections} > {log} 2>&1"


if USER_DATA:

    rule import_cells:
        input:
            config["source"]["path"],
        output:
            directory(f"results/{DATASET}/cells.zarr"),
        log:
            f"logs/import_{DATASET}.log",
        benchmark:
            f"logs/benchmarks/import_{DATASET}.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=240,
        params:
            args=import_args(),
            chunk_cells=config["assemble"]["chunk_cells"],
        shell:
            "abc-pipeline import {params.args} --out {output} --chunk-cells {params.chunk_cells} --no-progress "
            "> {log} 2>&1"

else:

    rule download:
        input:
            f"{SYNTH_ROOT}/releases/{RELEASE}/manifest.json" if SYNTHETIC else [],
        output:
            summary=f"resources/download_{DATASET}_{RELEASE}.json",
        log:
            f"logs/download_{DATASET}.log",
        benchmark:
            f"logs/benchmarks/download_{DATASET}.tsv"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=600,
        params:
            dataset=DATASET,
            release=RELEASE,
            cache=CACHE,
            base_url=base_url(),
            jobs=config["download"]["jobs"],
            retries=config["download"]["retries"],
        shell:
            "abc-pipeline download --dataset {params.dataset} --release {params.release} --base-url {params.base_url} "
            "--cache {params.cache} --jobs {params.jobs} --retries {params.retries} --summary {output.summary} "
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
        threads: 1
        # Measured (docs/benchmarks.md): peak RSS 1.5-2.1 GB at chunk_cells 100,000 (0.5 M and 2 M cells alike);
        # ~2.7 GB expected at the real-atlas chunk of 200,000: 1.5x margin. ~7 min for 4.3 M cells on 2 busy cores.
        resources:
            mem_mb=4000,
            runtime=240,
        params:
            dataset=DATASET,
            release=RELEASE,
            cache=CACHE,
            chunk_cells=config["assemble"]["chunk_cells"],
        shell:
            "abc-pipeline assemble --dataset {params.dataset} --release {params.release} --cache {params.cache} "
            "--out {output} "
            "--chunk-cells {params.chunk_cells} --no-progress > {log} 2>&1"
