"""Command line interface ``abc-pipeline <subcommand>``: argument parsing only.

Every subcommand is registered by one ``_add_<name>`` function that declares its arguments and a
``run`` callable; the callable imports the library lazily (so ``abc-pipeline --help`` stays fast)
and calls exactly one library function.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
from pathlib import Path

from abc_pipeline import __version__
from abc_pipeline.errors import AbcPipelineError, InputError
from abc_pipeline.logs import setup_logging

log = logging.getLogger("abc_pipeline")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _finite_float(text: str) -> float:
    """argparse type: a finite number (no nan / inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


_OVERWRITE_HELP = "replace an abc-pipeline output of another kind at --out (never a file or folder of your own)"


# --------------------------------------------------------------------------------------------- atlas
def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic ABC release tree (manifest, CSVs, h5ad) for demos and tests")
    p.add_argument("--out", type=Path, required=True, help="release root to create (a bucket-like tree)")
    p.add_argument("--cells", type=int, default=20000, help="number of cells in the expression file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--release", default="20250531", help="release version written into the manifest")
    p.add_argument(
        "--chunk-cells", type=_positive_int, default=200_000, help="cells generated per chunk (sets peak memory)"
    )
    p.add_argument(
        "--sections",
        type=int,
        default=None,
        help="sections, 0.2 mm apart (1-59; default: about one per 10,000 cells, at least 4)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.atlas.synthetic import write_synthetic_release

        write_synthetic_release(
            a.out,
            n_cells=a.cells,
            seed=a.seed,
            release=a.release,
            chunk_cells=a.chunk_cells,
            n_sections=a.sections,
            progress=not a.no_progress,
        )

    p.set_defaults(run=run)


def _add_download(sub: argparse._SubParsersAction) -> None:
    from abc_pipeline.atlas.manifest import DEFAULT_BASE_URL

    p = sub.add_parser("download", help="download (resume, verify MD5) the files a dataset needs")
    p.add_argument("--dataset", default="MERFISH-C57BL6J-638850", help="dataset profile name")
    p.add_argument("--release", default="latest", help="release version (YYYYMMDD) or 'latest' (needs network)")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="bucket root URL (https://, http:// or file://)")
    p.add_argument(
        "--cache", type=Path, required=True, help="local mirror root (files land at <cache>/<relative_path>)"
    )
    p.add_argument("--jobs", type=_positive_int, default=4, help="files downloaded in parallel")
    p.add_argument("--retries", type=_positive_int, default=5, help="attempts per file before giving up")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--summary", type=Path, default=None, help="write a JSON record of the run (files, fetched, skipped)"
    )

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.atlas.download import download_dataset

        summary = download_dataset(
            a.dataset,
            release=a.release,
            base_url=a.base_url,
            cache_dir=a.cache,
            jobs=a.jobs,
            retries=a.retries,
            progress=not a.no_progress,
        )
        if a.summary is not None:
            summary.write_json(a.summary)

    p.set_defaults(run=run)


def _add_assemble(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "assemble", help="join metadata, taxonomy, parcellation, coordinates, log2 expression -> cells.zarr"
    )
    p.add_argument("--dataset", default="MERFISH-C57BL6J-638850", help="dataset profile name")
    p.add_argument("--release", default=None, help="release version; default: the newest manifest in the cache")
    p.add_argument("--cache", type=Path, required=True, help="local mirror root written by `download`")
    p.add_argument("--out", type=Path, required=True, help="output AnnData store, e.g. results/<dataset>/cells.zarr")
    p.add_argument("--chunk-cells", type=_positive_int, default=100_000, help="cells per chunk (sets peak memory)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.atlas.assemble import assemble_dataset

        assemble_dataset(
            a.dataset,
            cache_dir=a.cache,
            out=a.out,
            release=a.release,
            chunk_cells=a.chunk_cells,
            progress=not a.no_progress,
            overwrite=a.overwrite,
        )

    p.set_defaults(run=run)


def _add_import(sub: argparse._SubParsersAction) -> None:
    from abc_pipeline.atlas.user_options import EXPRESSION, KINDS, UNITS

    p = sub.add_parser("import", help="import your own spatial AnnData (h5ad/zarr) or MERSCOPE folder -> cells.zarr")
    p.add_argument("--kind", choices=KINDS, required=True, help="anndata (.h5ad / .zarr) or merscope (output folder)")
    p.add_argument("--input", type=Path, required=True, help="the AnnData file/store or the MERSCOPE folder")
    p.add_argument("--out", type=Path, required=True, help="cells.zarr to write, e.g. results/<dataset>/cells.zarr")
    p.add_argument("--coordinates", default="spatial", help="obsm key of the x, y[, z] coordinates (anndata)")
    p.add_argument("--unit", choices=list(UNITS), default="um", help="unit of the coordinates")
    p.add_argument("--section", default=None, help="obs column naming each cell's section/batch (default: one section)")
    p.add_argument("--section-name", default=None, help="name of the one section (default: the input's name)")
    p.add_argument(
        "--labels", nargs="*", default=[], metavar="COLUMN", help="obs columns to keep as categorical labels"
    )
    p.add_argument("--gene-symbols", default=None, help="var column with gene symbols (default: auto)")
    p.add_argument(
        "--expression",
        choices=EXPRESSION,
        default=None,
        help="log2: X is log expression (anndata default); counts: store log2(x + 1) (merscope default)",
    )
    p.add_argument("--chunk-cells", type=int, default=100_000, help="cells per chunk (sets peak memory)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.atlas.import_user import import_user_data

        import_user_data(
            a.kind,
            a.input,
            a.out,
            coordinates=a.coordinates,
            unit=a.unit,
            section=a.section,
            section_name=a.section_name,
            labels=a.labels,
            gene_symbols=a.gene_symbols,
            expression=a.expression,
            chunk_cells=a.chunk_cells,
            progress=not a.no_progress,
        )

    p.set_defaults(run=run)


# --------------------------------------------------------------------------------------------- raster
def _add_rasterize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rasterize", help="rasterize cells.zarr into a multichannel OME-Zarr grid (c,z,y,x) + label volumes"
    )
    p.add_argument("--cells", type=Path, required=True, help="cells.zarr written by `assemble`")
    p.add_argument(
        "--out", type=Path, required=True, help="raster to write, e.g. results/<dataset>/raster/<grid>.ome.zarr"
    )
    p.add_argument(
        "--space",
        choices=["section", "reconstructed", "ccf"],
        default="reconstructed",
        help="section: 2D per section (z = section order); reconstructed / ccf: 3D",
    )
    p.add_argument(
        "--voxel-size",
        type=float,
        nargs="+",
        metavar="MM",
        help="voxel size in mm: 1 value (y = x [= z in 3D]), 2 (y x) or 3 (z y x); default per space",
    )
    p.add_argument(
        "--bounds",
        type=float,
        nargs="+",
        metavar="MM",
        help="lo hi per axis in mm, ordered z y x (y x for --space section); default: data extent + margin",
    )
    p.add_argument("--margin", type=int, default=1, help="empty voxels added around the data extent (per side)")
    ch = p.add_mutually_exclusive_group()
    ch.add_argument(
        "--genes", nargs="+", metavar="GENE", help="channel genes (symbols or ids); default: all non-blank genes"
    )
    ch.add_argument("--genes-file", type=Path, help="text file with one gene per line")
    p.add_argument(
        "--pca", type=int, metavar="K", help="use the first K principal components (of the genes) as channels"
    )
    p.add_argument("--pca-sample", type=int, default=100_000, help="cells sampled to fit the PCA")
    p.add_argument(
        "--labels",
        nargs="*",
        metavar="COLUMN",
        help="categorical obs columns to rasterize as majority labels (default: class subclass "
        "parcellation_division parcellation_structure, those present; --labels alone: none)",
    )
    p.add_argument("--levels", type=int, default=3, help="pyramid levels (>= 2)")
    p.add_argument(
        "--chunk-cells", type=_positive_int, default=None, help="cells per Dask task (sets peak memory; default 50000)"
    )
    p.add_argument(
        "--scheduler", choices=["threads", "processes", "synchronous"], default="threads", help="local Dask scheduler"
    )
    p.add_argument("--workers", type=int, default=None, help="local Dask workers (default: all cores)")
    p.add_argument(
        "--address",
        default=None,
        help="dask.distributed scheduler address (e.g. tcp://node:8786); overrides --scheduler",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing raster or other abc-pipeline output (atomically; never your own files)",
    )
    p.add_argument(
        "--max-voxels",
        type=_positive_int,
        default=None,
        help="largest grid accepted, in voxels (default 2**31; a larger grid is almost always a wrong voxel size)",
    )
    p.add_argument(
        "--drop-nonfinite",
        action="store_true",
        help="skip cells with NaN or inf in X (counted and logged) instead of failing",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the PCA sample")
    p.add_argument(
        "--max-accumulator-gb",
        type=float,
        default=1.5,
        help="local threaded runs sum voxels in memory when the occupied voxels' sums fit this (GB); else spill to disk",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.raster.rasterize import rasterize

        genes = a.genes
        if a.genes_file is not None:
            genes = [g.strip() for g in a.genes_file.read_text().splitlines() if g.strip() and not g.startswith("#")]
            if not genes:
                raise InputError(
                    f"--genes-file {a.genes_file} names no gene (one symbol or id per line, # comments); "
                    "fill it or drop the option to use all genes"
                )
        if a.bounds is not None and len(a.bounds) % 2:
            raise InputError(f"--bounds needs pairs of values (lo hi per axis), got {len(a.bounds)} values")
        bounds = None if a.bounds is None else list(zip(a.bounds[0::2], a.bounds[1::2]))
        rasterize(
            a.cells,
            a.out,
            space=a.space,
            voxel_size=a.voxel_size,
            bounds=bounds,
            margin=a.margin,
            genes=genes,
            pca=a.pca,
            pca_sample=a.pca_sample,
            labels=a.labels,
            levels=a.levels,
            chunk_cells=a.chunk_cells,
            scheduler=a.scheduler,
            num_workers=a.workers,
            address=a.address,
            overwrite=a.overwrite,
            progress=not a.no_progress,
            seed=a.seed,
            max_accumulator_gb=a.max_accumulator_gb,
            drop_nonfinite=a.drop_nonfinite,
            **({"max_voxels": a.max_voxels} if a.max_voxels else {}),
        )

    p.set_defaults(run=run)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="print the zoo's first-layer channels and parameter counts (parameter matching)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=3, help="spatial dimensions")
    p.add_argument("--in-channels", type=int, required=True, help="image channels (input scalar fields)")
    p.add_argument("--classes", type=int, required=True, help="number of classes")
    p.add_argument(
        "--head", choices=("classify", "segment", "patch"), default="classify", help="what the networks output"
    )
    p.add_argument("--target-params", type=int, default=None, help="solve each model's width for this many parameters")
    p.add_argument("--width", type=int, default=None, help="fixed first-layer width (fields) instead")
    p.add_argument("--spacing", type=float, nargs="+", default=None, help="voxel spacing per axis (z y x)")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.nn.zoo import print_model_table

        print_model_table(
            a.dim,
            a.in_channels,
            a.classes,
            head=a.head,
            target_params=a.target_params,
            width=a.width,
            spacing=a.spacing,
        )

    p.set_defaults(run=run)


# --------------------------------------------------------------------------------------------- learn
def _add_train_npz(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-npz", help="train and test a zoo model on a MedMNIST-format .npz file")
    p.add_argument(
        "--npz", required=True, help="MedMNIST-format .npz path, or a MedMNIST name (needs medmnist + network)"
    )
    p.add_argument(
        "--model",
        required=True,
        help="zoo model: cnn, moment-trivial, moment-trivial-irrep, gcnn-regular, cfnet, se2n-interp (2D)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output directory (checkpoint.pt, last.pt, history.tsv, metrics.json)"
    )
    p.add_argument("--target-params", type=int, default=None, help="solve the model width for this many parameters")
    p.add_argument("--width", type=int, default=None, help="first-layer width (fields) instead")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine-annealed)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--patience", type=int, default=10, help="epochs without validation improvement before stopping")
    p.add_argument("--metric", default="balanced_accuracy", help="validation metric for early stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--download-root", type=Path, default=Path("data/medmnist"), help="where MedMNIST names download")
    p.add_argument("--restart", action="store_true", help="ignore OUT/last.pt and train from scratch")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.run_npz import train_npz

        train_npz(
            a.npz,
            a.model,
            a.out,
            width=a.width,
            target_params=a.target_params,
            epochs=a.epochs,
            batch_size=a.batch_size,
            lr=a.lr,
            weight_decay=a.weight_decay,
            seed=a.seed,
            patience=a.patience,
            metric=a.metric,
            device=a.device,
            num_workers=a.workers,
            progress=not a.no_progress,
            download_root=a.download_root,
            resume=not a.restart,
        )

    p.set_defaults(run=run)


def _add_atlas_data_options(p: argparse.ArgumentParser) -> None:
    """Options that pick an atlas task's data (``train`` and ``bench-models --raster``)."""
    p.add_argument(
        "--cells", type=Path, default=None, help="the cells.zarr the raster was made from (celltype: required)"
    )
    p.add_argument(
        "--level", default=None, help="label level (default: class for celltype, parcellation_division for region)"
    )
    p.add_argument(
        "--depth", type=int, default=None, help="stages (patch classifier, default 4) or U-Net levels (default 4)"
    )
    p.add_argument("--dim", default="auto", choices=("auto", "2", "3"), help="auto: 2 for section rasters, else 3")
    p.add_argument(
        "--patch-size", type=int, nargs="+", default=[5], help="celltype window P (odd; one or per axis z y x)"
    )
    p.add_argument("--tile-size", type=int, nargs="+", default=[64], help="region tile (voxels; one or per axis z y x)")
    p.add_argument(
        "--architecture",
        choices=("cell-context", "patch", "segment"),
        default=None,
        help="what the zoo model is built into: cell-context (own expression + invariant context, per "
        "cell), patch (patch classifier), segment (U-Net); default cell-context for celltype, "
        "segment for region",
    )
    p.add_argument(
        "--split-fractions",
        type=float,
        nargs=3,
        default=None,
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of the sections per split (default 0.7 0.15 0.15)",
    )
    p.add_argument(
        "--split-blocks",
        type=int,
        default=None,
        help="contiguous blocks of sections per split, interleaved along z so that every split spans "
        "the brain (default 3)",
    )
    p.add_argument(
        "--split-block-size",
        type=float,
        default=None,
        metavar="MM",
        help="split whole square blocks of this size (mm) inside the sections instead of whole sections "
        "(datasets of one or a few sections)",
    )


def _atlas_data_kwargs(a: argparse.Namespace) -> dict:
    """:func:`abc_pipeline.learn.atlas.atlas_data` keywords from :func:`_add_atlas_data_options` options."""

    def one_or_all(sizes: list[int]) -> int | list[int]:
        return sizes[0] if len(sizes) == 1 else sizes

    kwargs = {
        "level": a.level,
        "dim": a.dim if a.dim == "auto" else int(a.dim),
        "patch_size": one_or_all(a.patch_size),
        "tile_size": one_or_all(a.tile_size),
        "seed": a.seed,
        "architecture": a.architecture,
    }
    for key in ("split_fractions", "split_blocks", "split_block_size"):  # None: the library's defaults
        if getattr(a, key) is not None:
            kwargs[key] = getattr(a, key)
    return kwargs


def _add_bench_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-models", help="train zoo models parameter-matched on one dataset; one comparison table")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--npz", help="MedMNIST-format .npz path, or a MedMNIST name (needs medmnist + network)")
    data.add_argument("--raster", type=Path, help="an atlas raster (OME-Zarr from `rasterize`); needs --task")
    p.add_argument("--task", choices=("celltype", "region"), help="atlas task (with --raster)")
    _add_atlas_data_options(p)
    p.add_argument(
        "--out", type=Path, required=True, help="output directory (table, figures, one run folder per model)"
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="zoo models to compare (default cnn gcnn-regular moment-trivial moment-trivial-irrep); with "
        "--raster also the baselines logreg-expression, logreg-neighborhood",
    )
    _add_baseline_options(p)
    p.add_argument("--target-params", type=int, default=50_000, help="parameters per model (width solved per model)")
    p.add_argument(
        "--train-fraction",
        type=float,
        default=1.0,
        help="keep this fraction of the training data: a stratified subset of the samples (--npz) or "
        "evenly spaced training sections (--raster)",
    )
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the training-split subset (--npz)")
    p.add_argument(
        "--max-samples", type=int, default=None, help="celltype: cap the cells of every split (fixed subset)"
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine-annealed)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--patience", type=int, default=10, help="epochs without validation improvement before stopping")
    p.add_argument("--seed", type=int, default=0, help="training seed (and, with --raster, the split seed)")
    p.add_argument(
        "--angles",
        type=_finite_float,
        nargs="+",
        default=[0, 15, 30, 45, 60, 75, 90],
        help="equivariance-curve rotation angles in degrees (must include 45)",
    )
    p.add_argument("--curve-samples", type=int, default=256, help="test samples in the equivariance curve")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--download-root", type=Path, default=Path("data/medmnist"), help="where MedMNIST names download")
    p.add_argument("--restart", action="store_true", help="retrain every model from scratch")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.choices import is_baseline
        from abc_pipeline.learn.compare import DEFAULT_MODELS, bench_models, format_table, npz_task

        models = a.models or DEFAULT_MODELS
        zoo, baselines = [m for m in models if not is_baseline(m)], [m for m in models if is_baseline(m)]
        if baselines and a.npz is not None:
            raise InputError(
                f"--models {' '.join(baselines)}: the baselines read each cell's expression; they need "
                f"an atlas (--raster and --cells), not --npz"
            )
        if a.npz is not None:
            task = npz_task(a.npz, train_fraction=a.train_fraction, seed=a.subset_seed, download_root=a.download_root)
        else:
            from abc_pipeline.learn.atlas import atlas_task

            if a.task is None:
                raise InputError("bench-models --raster needs --task celltype or --task region")
            task = atlas_task(
                a.raster,
                a.cells,
                a.task,
                depth=a.depth,
                max_samples=a.max_samples,
                train_sections=a.train_fraction,
                **_atlas_data_kwargs(a),
            )
        extra = []
        if baselines:
            from abc_pipeline.learn.baselines import bench_baseline_rows

            kw = _atlas_data_kwargs(a)
            test = task.test
            extra = bench_baseline_rows(
                a.raster,
                a.cells,
                a.task,
                baselines,
                a.out,
                test_rows=getattr(test, "cells", None),
                test_targets=test.targets.numpy() if a.task == "celltype" else None,
                train_sections=a.train_fraction,
                level=kw["level"],
                dim=kw["dim"],
                seed=a.seed,
                neighbors=a.neighbors,
                max_train_cells=a.max_train_cells,
                c=a.logreg_c,
                **{k: kw[k] for k in ("split_fractions", "split_blocks") if k in kw},
            )
        table = bench_models(
            task,
            a.out,
            zoo,
            target_params=a.target_params,
            epochs=a.epochs,
            batch_size=a.batch_size,
            lr=a.lr,
            weight_decay=a.weight_decay,
            patience=a.patience,
            seed=a.seed,
            device=a.device,
            num_workers=a.workers,
            angles=a.angles,
            curve_samples=a.curve_samples,
            progress=not a.no_progress,
            resume=not a.restart,
            extra_rows=extra,
        )
        print(format_table(table))

    p.set_defaults(run=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a zoo model on a raster: cell types (patch classifier) or regions (U-Net)")
    p.add_argument("--raster", type=Path, required=True, help="OME-Zarr raster (abc-pipeline rasterize)")
    p.add_argument("--task", choices=("celltype", "region"), required=True)
    _add_atlas_data_options(p)
    p.add_argument(
        "--model",
        required=True,
        help="zoo model: cnn, moment-trivial, moment-trivial-irrep, gcnn-regular, se2n-interp (2D rasters); "
        "or a scikit-learn baseline: logreg-expression, logreg-neighborhood",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="run directory, e.g. results/<dataset>/models/<task>/<model>/"
    )
    _add_baseline_options(p)
    p.add_argument("--target-params", type=int, default=None, help="solve the model width for this many parameters")
    p.add_argument("--width", type=int, default=None, help="first-layer width (fields) instead")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine-annealed)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--patience", type=int, default=10, help="epochs without validation improvement before stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-samples-per-epoch", type=int, default=None, help="celltype: cap cells per split (fixed subset)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    restart = p.add_mutually_exclusive_group()
    restart.add_argument("--restart", action="store_true", help="ignore OUT/last.pt and train from scratch")
    restart.add_argument(
        "--restart-if-changed",
        action="store_true",
        help="resume OUT/last.pt only if it has this run's configuration, else start over "
        "(default: refuse to mix runs)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.atlas import train_atlas_task
        from abc_pipeline.learn.choices import is_baseline

        if is_baseline(a.model):
            _train_baseline(a)
            return
        train_atlas_task(
            a.raster,
            a.cells,
            a.task,
            a.model,
            a.out,
            width=a.width,
            target_params=a.target_params,
            depth=a.depth,
            epochs=a.epochs,
            batch_size=a.batch_size,
            lr=a.lr,
            weight_decay=a.weight_decay,
            patience=a.patience,
            max_samples_per_epoch=a.max_samples_per_epoch,
            device=a.device,
            num_workers=a.workers,
            progress=not a.no_progress,
            resume="if-unchanged" if a.restart_if_changed else not a.restart,
            **_atlas_data_kwargs(a),
        )

    p.set_defaults(run=run)


def _add_baseline_options(p: argparse.ArgumentParser) -> None:
    """Options of the scikit-learn baselines (``train --model logreg-*``)."""
    from abc_pipeline.learn.choices import DEFAULT_C, DEFAULT_MAX_TRAIN_CELLS, DEFAULT_NEIGHBORS

    p.add_argument(
        "--neighbors",
        type=int,
        default=DEFAULT_NEIGHBORS,
        help="logreg-neighborhood: nearest cells of the same section averaged into the features",
    )
    p.add_argument(
        "--max-train-cells",
        type=int,
        default=DEFAULT_MAX_TRAIN_CELLS,
        help="baselines: training cells used at most (seeded class-stratified subsample)",
    )
    p.add_argument("--logreg-c", type=float, default=DEFAULT_C, help="baselines: inverse regularisation strength C")


def _train_baseline(a: argparse.Namespace) -> None:
    from abc_pipeline.learn.baselines import train_baseline

    kw = _atlas_data_kwargs(a)
    train_baseline(
        a.raster,
        a.cells,
        a.task,
        a.model,
        a.out,
        level=kw["level"],
        dim=kw["dim"],
        seed=a.seed,
        neighbors=a.neighbors,
        max_train_cells=a.max_train_cells,
        c=a.logreg_c,
        **{k: kw[k] for k in ("split_fractions", "split_blocks") if k in kw},
    )


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="dense prediction over a raster (OME-Zarr labels + probabilities) and per cell")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt of abc-pipeline train")
    p.add_argument("--raster", type=Path, required=True, help="OME-Zarr raster with the training channels")
    p.add_argument(
        "--cells", type=Path, default=None, help="cells.zarr of the raster (checks cell order, scores test cells)"
    )
    p.add_argument("--out", type=Path, required=True, help="predictions.zarr to write (replaced atomically)")
    p.add_argument(
        "--tile-size",
        type=int,
        nargs="+",
        default=None,
        help="tile core (default 192 in 2D, 16 64 64 in 3D; axes are split into equal cores)",
    )
    p.add_argument("--halo", type=int, nargs="+", default=None, help="region U-Net context per side (default 16)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tiles per forward pass (default: as many as a voxel budget allows, 32k voxels on CPU)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.predict import predict_raster

        one = lambda v: v[0] if v is not None and len(v) == 1 else v  # noqa: E731
        predict_raster(
            a.checkpoint,
            a.raster,
            a.out,
            cells=a.cells,
            tile_size=one(a.tile_size),
            halo=one(a.halo),
            batch_size=a.batch_size,
            device=a.device,
            progress=not a.no_progress,
            overwrite=a.overwrite,
        )

    p.set_defaults(run=run)


def _add_annotate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("annotate", help="write predictions back to AnnData (cells_annotated.h5ad)")
    p.add_argument("--cells", type=Path, required=True, help="cells.zarr (abc-pipeline assemble)")
    p.add_argument(
        "--predictions",
        type=Path,
        nargs="+",
        required=True,
        help="predictions.zarr stores (the first per task becomes pred_<task>)",
    )
    p.add_argument("--out", type=Path, required=True, help="h5ad to write, e.g. results/<dataset>/cells_annotated.h5ad")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.annotate import annotate_cells

        annotate_cells(a.cells, a.predictions, a.out, overwrite=a.overwrite)

    p.set_defaults(run=run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="metrics table over all trained models and an overview figure of the predictions")
    p.add_argument("--annotated", type=Path, required=True, help="cells_annotated.h5ad (abc-pipeline annotate)")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run directories models/<task>/<model>/")
    p.add_argument("--out", type=Path, required=True, help="report folder, e.g. results/<dataset>/report")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.report import write_report

        write_report(a.annotated, a.runs, a.out)

    p.set_defaults(run=run)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="test metrics, grid-symmetry scores, equivariance curve and figures of a model")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt of abc-pipeline train")
    p.add_argument("--raster", type=Path, required=True, help="the raster the model was trained on")
    p.add_argument(
        "--predictions", type=Path, required=True, help="predictions.zarr of this checkpoint (abc-pipeline predict)"
    )
    p.add_argument(
        "--cells", type=Path, default=None, help="cells.zarr of the raster (celltype: required, the true labels)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output directory, e.g. results/<d>/models/<task>/<model>/evaluation/"
    )
    p.add_argument("--windows", type=int, default=2, help="test windows (sections / z-slabs) the model runs on")
    p.add_argument(
        "--window-size", type=int, default=None, help="window side in voxels, in-plane (default 128 in 2D, 64 in 3D)"
    )
    p.add_argument("--window-depth", type=int, default=8, help="3D: z indices per window")
    p.add_argument(
        "--halo", type=int, default=16, help="region: U-Net context read around each window (voxels per side)"
    )
    p.add_argument(
        "--angles",
        type=_finite_float,
        nargs="+",
        default=[0, 15, 30, 45, 60, 75, 90],
        help="equivariance-curve rotation angles in degrees (in-plane)",
    )
    p.add_argument("--map-sections", type=int, default=3, help="test sections / z-slices in maps.png")
    p.add_argument("--max-test-cells", type=int, default=500_000, help="celltype: test cells scored (evenly strided)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument(
        "--any-angles",
        type=float,
        nargs="+",
        default=None,
        help="in-plane rotations (degrees) of the test sections in the any-angle score (default 0-345 by 15)",
    )
    p.add_argument(
        "--any-angle-sections",
        type=int,
        default=None,
        help="test sections (3D: test z-blocks) rotated in the any-angle score (default 2)",
    )

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.evaluate_run import evaluate_run

        evaluate_run(
            a.checkpoint,
            a.raster,
            a.predictions,
            a.out,
            cells=a.cells,
            windows=a.windows,
            window_size=a.window_size,
            window_depth=a.window_depth,
            halo=a.halo,
            angles=a.angles,
            map_sections=a.map_sections,
            max_test_cells=a.max_test_cells,
            batch_size=a.batch_size,
            device=a.device,
            overwrite=a.overwrite,
            **{
                k: v
                for k, v in (("any_angles", a.any_angles), ("any_angle_sections", a.any_angle_sections))
                if v is not None
            },
        )

    p.set_defaults(run=run)


def _add_transfer(sub: argparse._SubParsersAction) -> None:
    from abc_pipeline.atlas.user_options import EXPRESSION, UNITS
    from abc_pipeline.learn.choices import TRANSFER_KINDS as KINDS

    p = sub.add_parser("transfer", help="annotate your own data (AnnData, MERSCOPE, cells.zarr) with trained models")
    p.add_argument(
        "--checkpoint", type=Path, nargs="+", required=True, help="checkpoint.pt files of abc-pipeline train"
    )
    p.add_argument(
        "--input", type=Path, required=True, help="your .h5ad / .zarr, MERSCOPE folder or imported cells.zarr"
    )
    p.add_argument("--kind", choices=KINDS, default="anndata", help="what --input is")
    p.add_argument("--out", type=Path, required=True, help="annotated .h5ad to write (a copy of your AnnData)")
    p.add_argument("--coordinates", default="spatial", help="obsm key of the x, y[, z] coordinates (anndata)")
    p.add_argument("--unit", choices=list(UNITS), default="um", help="unit of the coordinates")
    p.add_argument("--section", default=None, help="obs column naming each cell's section (default: one section)")
    p.add_argument("--gene-symbols", default=None, help="var column with gene symbols (default: auto)")
    p.add_argument(
        "--expression",
        choices=EXPRESSION,
        default=None,
        help="log2: X is log expression (anndata default); counts: log2(x + 1) is used (merscope default)",
    )
    p.add_argument(
        "--fill-missing-genes",
        action="store_true",
        help="read the model's genes that the data lacks as 0 (warned and recorded) instead of refusing",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass (default: a voxel budget)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.transfer import transfer

        options = (
            {}
            if a.kind == "cells"
            else {
                "coordinates": a.coordinates,
                "unit": a.unit,
                "section": a.section,
                "gene_symbols": a.gene_symbols,
                "expression": a.expression,
            }
        )
        transfer(
            a.checkpoint,
            a.input,
            a.out,
            kind=a.kind,
            fill_missing_genes=a.fill_missing_genes,
            device=a.device,
            batch_size=a.batch_size,
            progress=not a.no_progress,
            **options,
        )

    p.set_defaults(run=run)


_REGISTRARS = [
    _add_synth,
    _add_download,
    _add_assemble,
    _add_import,
    _add_rasterize,
    _add_models,
    _add_train_npz,
    _add_train,
    _add_predict,
    _add_annotate,
    _add_evaluate,
    _add_bench_models,
    _add_report,
    _add_transfer,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abc-pipeline",
        description="Allen Brain Cell Atlas MERFISH pipeline: download, assemble, rasterize, train, predict.",
    )
    parser.add_argument("--version", action="version", version=f"abc-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for register in _REGISTRARS:
        register(sub)
    return parser


#: What to do about a failed file operation, by errno.
_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space there or write the output to a larger file system",
    errno.EDQUOT: "the disk quota is exhausted: free space or write the output elsewhere",
    errno.EACCES: "permission denied: check the permissions of that path (and its folders) or choose another path",
    errno.EPERM: "operation not permitted: check the permissions of that path or choose another path",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOTDIR: "a part of that path is a file, not a folder: fix the path or move the file away",
    errno.EISDIR: "that path is a folder where a file is expected: fix the path",
    errno.ELOOP: "that path is a symbolic link where a file is expected: remove the link",
}


def describe_error(exc: BaseException, paths: list[Path]) -> str | None:
    """One line for a failure the user can act on (the path and the fix), or None for a bug (traceback).

    ``paths``: the command's path arguments, named when the failure does not carry its own path."""
    if isinstance(exc, AbcPipelineError):
        return str(exc)  # library messages name the file, the field and the fix
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename or exc}: no such file or folder; check the path" if exc.filename else str(exc)
    if isinstance(exc, OSError):
        where = exc.filename or ", ".join(map(str, paths)) or "?"
        fix = _OS_FIXES.get(exc.errno, "check that the path is what the option asks for")
        return (
            f"{where}: {exc.strerror or exc}; {fix}. Outputs are renamed into place only when complete, so "
            "nothing half-written was kept; run the command again afterwards"
        )
    if isinstance(exc, RuntimeError) and "decompress" in str(exc).lower():
        return (
            f"a Zarr chunk of one of the inputs ({', '.join(map(str, paths))}) cannot be decoded ({exc}); the "
            "store is damaged: re-run the step that wrote it"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``abc-pipeline`` console script; returns the exit status.

    Failures the user can fix (bad input, a full disk, missing permissions, a damaged store) end with one
    line naming the path and the fix and exit status 2 (``-v``: with the traceback); others are bugs and
    raise."""
    args = build_parser().parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        args.run(args)
    except Exception as exc:
        paths = [v for v in vars(args).values() if isinstance(v, Path)]
        message = describe_error(exc, paths)
        if message is None:
            raise
        log.error("%s", message)
        if args.verbose:
            raise
        return 2
    return 0


def _hdf5_objects_left_open() -> bool:
    """Whether HDF5 still holds objects (of a file whose writes failed: it could not close them)."""
    h5py = sys.modules.get("h5py")
    return h5py is not None and len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_ALL)) > 0


def run() -> None:
    """Console-script entry point: :func:`main`, then exit with its status.

    After a failure that left HDF5 objects open (writes to a full disk: HDF5 cannot flush and close them), the
    process ends without the libraries' exit handlers, which would crash in HDF5 (h5py#914). Outputs were
    already cleaned up by then; the error line was logged and is flushed first."""
    status = main()
    if status and _hdf5_objects_left_open():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
