# Shared helpers: config validation and output paths. Logic lives in abc_pipeline; rules stay thin.
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

DATASET = config["dataset"]
RELEASE = str(config["release"])
CACHE = config["cache_dir"]
SYNTHETIC = config["source"]["kind"] == "synthetic"
SYNTH_ROOT = "resources/synthetic_release"
RASTERS = {spec["name"]: spec for spec in config["rasters"]}


def base_url():
    """Bucket root to download from (the public bucket, a mirror, or the synthetic demo tree)."""
    if SYNTHETIC:
        return Path(SYNTH_ROOT).resolve().as_uri()
    return config["source"]["base_url"]


def final_outputs():
    return [f"results/{DATASET}/cells.zarr"] + [
        f"results/{DATASET}/raster/{grid}.ome.zarr" for grid in RASTERS
    ]


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
