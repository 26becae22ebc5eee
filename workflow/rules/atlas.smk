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
        # Measured (docs/benchmarks.md, full-size run): 4.33 M cells in 657 s wall, peak RSS 1.49 GB (flat in the cell
        # count, set by the 200,000-cell chunk): 2.7x margin on memory; runtime > 30 min on a busy 2-core node.
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
        # Measured (docs/benchmarks.md, full-size run): 4.1 M cells in 317 s wall, peak RSS 2.91 GB at the real-atlas
        # chunk_cells of 200,000 (flat in the cell count): 1.7x margin; runtime 45x (slow shared file systems).
        resources:
            mem_mb=5000,
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
