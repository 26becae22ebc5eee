# Shared helpers: config validation and output paths. Logic lives in abc_pipeline; rules stay thin.
from pathlib import Path

from snakemake.utils import validate

from abc_pipeline.config_checks import check_workflow_config

validate(config, schema="../schemas/config.schema.yaml")
check_workflow_config(config)  # what the schema cannot express (duplicate names, primary_model in models, ...)

from abc_pipeline.learn import tasks as atlas_tasks  # noqa: E402
from abc_pipeline.learn.choices import check_angles, is_baseline  # noqa: E402

check_angles(config["evaluation"]["any_angles"], "config key evaluation.any_angles")

DATASET = config["dataset"]
RELEASE = str(config.get("release", ""))
CACHE = config["cache_dir"]
SYNTHETIC = config["source"]["kind"] == "synthetic"
USER_DATA = config["source"]["kind"] in ("anndata", "merscope")
SYNTH_ROOT = "resources/synthetic_release"
RASTERS = {spec["name"]: spec for spec in config["rasters"]}
TASKS = config["tasks"]
MODELS = config["models"]
TRANSFERS = {spec["name"]: spec for spec in config["transfer"]}


wildcard_constraints:
    task="|".join(TASKS) or "none",
    model="|".join(MODELS) or "none",
    grid="|".join(RASTERS) or "none",
    name="|".join(TRANSFERS) or "none",
    percent="[0-9]+",


def base_url():
    """Bucket root to download from (the public bucket, a mirror, or the synthetic demo tree)."""
    if SYNTHETIC:
        return Path(SYNTH_ROOT).resolve().as_uri()
    return config["source"]["base_url"]


def final_outputs():
    outputs = [f"results/{DATASET}/cells.zarr"]
    outputs += [f"results/{DATASET}/raster/{grid}.ome.zarr" for grid in RASTERS]
    if TASKS:
        outputs.append(f"results/{DATASET}/cells_annotated.h5ad")
        outputs.append(f"results/{DATASET}/report/metrics.tsv")
    return outputs


def import_args():
    """CLI options of `abc-pipeline import` from config['source'] (your own AnnData or MERSCOPE folder)."""
    src = config["source"]
    args = [
        f"--kind {src['kind']}",
        f"--input {src['path']}",
        f"--coordinates {src['coordinates']}",
        f"--unit {src['unit']}",
    ]
    for key in ("section", "section_name", "gene_symbols", "expression"):
        if src.get(key) is not None:
            args.append(f"--{key.replace('_', '-')} {src[key]}")
    if src["labels"]:
        args.append("--labels " + " ".join(src["labels"]))
    return " ".join(args)


def raster_args(wildcards):
    """CLI options of one configured grid (see config/README.md, key `rasters`)."""
    spec = RASTERS[wildcards.grid]
    args = [f"--space {spec['space']}"]
    if spec.get("voxel_size"):
        args.append("--voxel-size " + " ".join(str(v) for v in spec["voxel_size"]))
    if spec.get("pca"):
        args.append(f"--pca {spec['pca']}")
    if spec.get("genes"):
        args.append("--genes " + " ".join(spec["genes"]))
    if "labels" in spec:
        args.append("--labels " + " ".join(spec["labels"]))
    args.append(f"--levels {spec.get('levels', 2)}")
    dask_cfg = config["dask"]
    if dask_cfg.get("address"):
        args.append(f"--address {dask_cfg['address']}")
    else:
        args.append(f"--scheduler {dask_cfg['scheduler']}")
    return " ".join(args)


def task_raster(wildcards):
    """The raster a task trains and predicts on."""
    return f"results/{DATASET}/raster/{TASKS[wildcards.task]['raster']}.ome.zarr"


def task_data_args(task, architecture=None):
    """CLI options that pick a task's data (`train`, `bench-models --raster`): level, window, splits.
    ``architecture``: what `train` builds the model into (config tasks.<task>.architecture); None: the
    command's own default (bench-models: a patch classifier for celltype, a U-Net for region)."""
    spec, training = TASKS[task], config["training"]
    args = [f"--level {spec['level']}"]
    if architecture is not None:
        args.append(f"--architecture {architecture}")
    tiles = (architecture or atlas_tasks.by_name(task).raster_architecture) == "segment"
    size_key = "tile_size" if tiles else "patch_size"
    if spec.get(size_key):
        args.append(f"--{size_key.replace('_', '-')} " + " ".join(str(v) for v in spec[size_key]))
    args.append("--split-fractions " + " ".join(str(v) for v in training["split_fractions"]))
    args.append(f"--split-blocks {training['split_blocks']}")
    if training.get("split_block_size") is not None:
        args.append(f"--split-block-size {training['split_block_size']}")
    return args


def training_args(task, **overrides):
    """CLI options shared by `train` and `bench-models` from config['training'], then ``overrides``, then the
    task's own `target_params` / `batch_size` / `epochs` (each later one wins where it is set)."""
    task_keys = {k: TASKS[task].get(k) for k in ("target_params", "batch_size", "epochs")}
    training = dict(config["training"])
    for layer in (overrides, task_keys):
        training.update({k: v for k, v in layer.items() if v is not None})
    args = []
    for key in ("target_params", "epochs", "batch_size", "lr", "patience", "seed", "device"):
        if training.get(key) is not None:
            args.append(f"--{key.replace('_', '-')} {training[key]}")
    return args


def train_args(wildcards):
    """CLI options of `abc-pipeline train` for one task from config['tasks'] and config['training'] (a
    baseline: config['baselines'])."""
    architecture = TASKS[wildcards.task].get("architecture")  # the schema default when not configured
    args = task_data_args(wildcards.task, architecture) + training_args(wildcards.task)
    if is_baseline(wildcards.model):
        args.append(baseline_args())
    else:
        args.append(f"--class-weights {config['training']['class_weights']}")
        radii = TASKS[wildcards.task].get("neighborhood_radii")
        if radii is not None:
            args.append("--neighborhood-radii " + " ".join(str(r) for r in radii))
    if config["training"].get("max_samples_per_epoch") is not None:
        args.append(f"--max-samples-per-epoch {config['training']['max_samples_per_epoch']}")
    return " ".join(args)


def model_threads(wildcards):
    """Threads of a train / predict / evaluate job: a network uses up to 8 (torch's intra-op threads, capped by
    --cores); a scikit-learn baseline is single-threaded, so two of them share a 2-core machine."""
    return 1 if is_baseline(wildcards.model) else 8


def baseline_args():
    """CLI options of the scikit-learn baselines (`train`, `bench-models`) from config['baselines']."""
    spec = config["baselines"]
    args = [f"--neighbors {spec['neighbors']}", f"--logreg-c {spec['c']}"]
    if spec["max_train_cells"] is not None:
        args.append(f"--max-train-cells {spec['max_train_cells']}")
    return " ".join(args)


def evaluate_args():
    """CLI options of `abc-pipeline evaluate` from config['evaluation']."""
    spec = config["evaluation"]
    return (
        f"--any-angles {' '.join(str(a) for a in spec['any_angles'])} "
        f"--any-angle-sections {spec['any_angle_sections']}"
    )


def bench_args(wildcards):
    """CLI options of `abc-pipeline bench-models --raster` for one task and training fraction (config['bench'])."""
    bench = config["bench"]
    args = task_data_args(wildcards.task) + training_args(
        wildcards.task, target_params=bench["target_params"], epochs=bench["epochs"]
    )
    args.append(f"--train-fraction {int(wildcards.percent) / 100}")
    args.append("--models " + " ".join(bench["models"]))
    if any(is_baseline(m) for m in bench["models"]):
        args.append(baseline_args())
    if config["training"].get("max_samples_per_epoch") is not None:
        args.append(f"--max-samples {config['training']['max_samples_per_epoch']}")
    return " ".join(args)


def bench_tables():
    """One bench-models table per task and training fraction (`snakemake bench`)."""
    return [
        f"results/{DATASET}/bench/{task}/train_{round(100 * f)}pct/bench_models.tsv"
        for task in TASKS
        for f in config["bench"]["train_fractions"]
    ]


def prediction_stores():
    """Every task x model prediction store; the primary model's come first (they become obs['pred_<task>'])."""
    models = sorted(MODELS, key=lambda m: m != config["primary_model"])
    return [f"results/{DATASET}/models/{task}/{model}/predictions.zarr" for task in TASKS for model in models]


def transfer_args(wildcards):
    """CLI options of `abc-pipeline transfer` for one dataset of config['transfer']."""
    spec = TRANSFERS[wildcards.name]
    args = [f"--kind {spec['kind']}", f"--coordinates {spec['coordinates']}", f"--unit {spec['unit']}"]
    for key in ("section", "gene_symbols", "expression"):
        if spec.get(key) is not None:
            args.append(f"--{key.replace('_', '-')} {spec[key]}")
    if spec["fill_missing_genes"]:
        args.append("--fill-missing-genes")
    return " ".join(args)
