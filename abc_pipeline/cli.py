"""Command line interface ``abc-pipeline <subcommand>``: argument parsing only.

Every subcommand is registered by one ``_add_<name>`` function that declares its arguments and a
``run`` callable; the callable imports the library lazily (so ``abc-pipeline --help`` stays fast)
and calls exactly one library function.

Names and defaults come from the library, never re-declared here:
- an option that sets a keyword of the called function is declared by :func:`_option`: it is ``None`` unless
  given, ``run`` passes only the given ones (:func:`_given`), so the function's own default applies, and the help
  shows that default (:class:`_LibraryDefault`): the torch-free constant the function's signature uses
  (:mod:`abc_pipeline.learn.choices` for the learning steps), else the function's signature;
- model, head, task, space, scheduler and dataset names are the library's (:class:`_LibraryNames`).
Both are read only when argparse needs them (a value to check, help to print), so that building the parser imports
no torch (and the help of train, train-npz and bench-models none either; the other subcommands' help imports their
library module). Options that several subcommands share are declared once, by the ``_add_*_options`` helpers.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import inspect
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------------------- library names and defaults
def _library(path: str) -> Any:
    """The library object at ``path``, ``"module:name"`` (importing the module)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _as_option_text(value: Any) -> str:
    """A default as it is typed on the command line: sequences space-separated, numbers in their shortest form."""
    if isinstance(value, dict):  # a default per raster dimensions
        return ", ".join(f"{k}D: {_as_option_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, range)):
        return " ".join(_as_option_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


class _LibraryDefault:
    """The library's default of one option: the default of ``keyword`` in the signature of the function at
    ``path`` (``"module:function"``), or the constant at ``path``. ``str()`` reads it (importing the module)."""

    def __init__(self, path: str, keyword: str) -> None:
        self.path, self.keyword = path, keyword

    def value(self) -> Any:
        """The default value; :class:`TypeError` when the function has no such keyword default (a CLI bug)."""
        obj = _library(self.path)
        if not callable(obj):
            return obj
        parameter = inspect.signature(obj).parameters.get(self.keyword)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            raise TypeError(f"{self.path} has no keyword {self.keyword!r} with a default")
        return parameter.default

    def __str__(self) -> str:
        return _as_option_text(self.value())


def _option(
    p: argparse._ActionsContainer, *flags: str, default_of: str, keyword: str | None = None, **kwargs: Any
) -> argparse.Action:
    """Add an option that sets ``keyword`` (default: the option's ``dest``) of the library function at
    ``default_of`` (``"module:function"``, or the constant holding the default): ``None`` unless given, so that
    :func:`_given` leaves it out and the function's default applies; the help ends with that default."""
    action = p.add_argument(*flags, default=None, **kwargs)
    action.library_default = _LibraryDefault(default_of, keyword or action.dest)  # type: ignore[attr-defined]
    action.help = f"{action.help} (default: %(library_default)s)" if action.help else "default: %(library_default)s"
    return action


class _PerTask:
    """An option's library default per atlas task (``attribute`` of :class:`abc_pipeline.learn.tasks.AtlasTask`),
    for the help's ``%(per_task)s``; ``str()`` reads it (``class for celltype, ...``)."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute

    def __str__(self) -> str:
        from abc_pipeline.learn.tasks import TASKS

        return ", ".join(f"{getattr(task, self.attribute)} for {name}" for name, task in TASKS.items())


def _given(**kwargs: Any) -> dict[str, Any]:
    """The keywords whose option was given (not ``None``); the called function's defaults apply to the rest."""
    return {k: v for k, v in kwargs.items() if v is not None}


class _LibraryNames(Sequence[str]):
    """Choices of an option: the names in the library collections at ``paths`` (``"module:name"``; a mapping gives
    its keys), in order, read when argparse first needs them (to check a value or print help). An option with these
    choices names a ``metavar`` (else argparse would list them while declaring it); its help can show them as
    ``%(choices)s``."""

    def __init__(self, *paths: str) -> None:
        self._paths = paths

    @functools.cached_property
    def _names(self) -> tuple[str, ...]:
        return tuple(name for path in self._paths for name in _library(path))

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self._names[index]

    def __len__(self) -> int:
        return len(self._names)


#: The torch-free module of the learning steps' names and defaults (what the help of train, train-npz and
#: bench-models reads, so that it prints without importing torch).
_CHOICES = "abc_pipeline.learn.choices"
_ZOO_MODELS = _LibraryNames(f"{_CHOICES}:ZOO_MODELS")
#: What ``train`` and ``bench-models --raster`` train: zoo networks and scikit-learn baselines.
_MODELS = _LibraryNames(f"{_CHOICES}:ZOO_MODELS", f"{_CHOICES}:BASELINES")
_HEADS = _LibraryNames(f"{_CHOICES}:ZOO_HEADS")
_CLASS_WEIGHTS = _LibraryNames(f"{_CHOICES}:CLASS_WEIGHTS")
_ATLAS_TASKS = _LibraryNames(f"{_CHOICES}:TASKS")


# --------------------------------------------------------------------------------------------- shared options
def _add_no_progress(p: argparse._ActionsContainer) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_device(p: argparse._ActionsContainer, default_of: str) -> None:
    _option(p, "--device", default_of=default_of, help="auto (CUDA when present), cpu, cuda, cuda:1, ...")


def _add_dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="MERFISH-C57BL6J-638850",
        choices=_LibraryNames("abc_pipeline.atlas.manifest:PROFILES"),
        metavar="NAME",
        help="ABC dataset profile: %(choices)s (default: %(default)s)",
    )


def _add_task(p: argparse.ArgumentParser, *, required: bool, text: str = "atlas task") -> None:
    p.add_argument("--task", choices=_ATLAS_TASKS, metavar="TASK", required=required, help=f"{text}: %(choices)s")


def _add_download_root(p: argparse.ArgumentParser) -> None:
    _option(
        p,
        "--download-root",
        type=Path,
        default_of=f"{_CHOICES}:DEFAULT_DOWNLOAD_ROOT",
        help="where MedMNIST names download",
    )


def _add_curve_angles(p: argparse.ArgumentParser, default_of: str, note: str) -> None:
    _option(
        p,
        "--angles",
        type=_finite_float,
        nargs="+",
        default_of=default_of,
        help=f"equivariance-curve rotation angles in degrees ({note})",
    )


def _add_user_data_options(p: argparse.ArgumentParser) -> None:
    """Options that read your own AnnData or MERSCOPE folder (``import``, ``transfer``): keywords of
    :func:`abc_pipeline.atlas.import_user.import_user_data` (:func:`_user_data_kwargs`)."""
    from abc_pipeline.atlas.user_options import EXPRESSION, UNITS

    light = "abc_pipeline.atlas.user_options"
    _option(p, "--coordinates", default_of=f"{light}:DEFAULT_COORDINATES", help="obsm key of the x, y[, z] coordinates")
    _option(p, "--unit", choices=list(UNITS), default_of=f"{light}:DEFAULT_UNIT", help="unit of the coordinates")
    p.add_argument("--section", default=None, help="obs column naming each cell's section/batch (default: one section)")
    p.add_argument("--gene-symbols", default=None, help="var column with gene symbols (default: auto)")
    p.add_argument(
        "--expression",
        choices=EXPRESSION,
        default=None,
        help="log2: X is log expression (anndata default); counts: log2(x + 1) is used (merscope default)",
    )


def _user_data_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """:func:`abc_pipeline.atlas.import_user.import_user_data` keywords of :func:`_add_user_data_options`."""
    return _given(
        coordinates=a.coordinates, unit=a.unit, section=a.section, gene_symbols=a.gene_symbols, expression=a.expression
    )


def _add_model_size_options(p: argparse.ArgumentParser) -> None:
    """The width of one zoo network (``train``, ``train-npz``)."""
    p.add_argument(
        "--target-params",
        type=int,
        default=None,
        help="solve the model width for this many parameters (default: the model's default width)",
    )
    p.add_argument("--width", type=int, default=None, help="first-layer width (fields) instead")


def _add_training_options(p: argparse.ArgumentParser, epochs: str = "DEFAULT_EPOCHS") -> None:
    """Options of the training loop (``train``, ``train-npz``, ``bench-models``; :func:`_training_kwargs`), with
    the defaults of :mod:`abc_pipeline.learn.choices` that those functions declare; ``epochs``: the name of the
    epochs default there."""
    g = p.add_argument_group("training")
    _option(g, "--epochs", type=int, default_of=f"{_CHOICES}:{epochs}", help="epochs at most")
    _option(g, "--batch-size", type=int, default_of=f"{_CHOICES}:DEFAULT_BATCH_SIZE", help="samples per batch")
    _option(g, "--lr", type=float, default_of=f"{_CHOICES}:DEFAULT_LR", help="AdamW learning rate (cosine-annealed)")
    _option(g, "--weight-decay", type=float, default_of=f"{_CHOICES}:DEFAULT_WEIGHT_DECAY", help="AdamW weight decay")
    _option(
        g,
        "--patience",
        type=int,
        default_of=f"{_CHOICES}:DEFAULT_PATIENCE",
        help="epochs without validation improvement before stopping",
    )
    _option(
        g,
        "--seed",
        type=int,
        default_of=f"{_CHOICES}:DEFAULT_SEED",
        help="training seed (atlas rasters: also the split seed)",
    )
    _add_device(g, f"{_CHOICES}:DEFAULT_DEVICE")
    _option(g, "--workers", type=int, default_of=f"{_CHOICES}:DEFAULT_WORKERS", help="data-loader processes")
    _add_no_progress(g)


def _training_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """Library keywords of :func:`_add_training_options`."""
    return {
        "progress": not a.no_progress,
        **_given(
            epochs=a.epochs,
            batch_size=a.batch_size,
            lr=a.lr,
            weight_decay=a.weight_decay,
            patience=a.patience,
            seed=a.seed,
            device=a.device,
            num_workers=a.workers,
        ),
    }


def _add_atlas_data_options(p: argparse.ArgumentParser) -> None:
    """Options that pick an atlas task's data (``train`` and ``bench-models --raster``): keywords of
    :func:`abc_pipeline.learn.atlas.atlas_data` (:func:`_atlas_data_kwargs`)."""
    p.add_argument(
        "--cells", type=Path, default=None, help="the cells.zarr the raster was made from (celltype: required)"
    )
    level = p.add_argument("--level", default=None, help="label level (default: %(per_task)s)")
    level.per_task = _PerTask("default_level")  # type: ignore[attr-defined]
    p.add_argument(
        "--depth", type=int, default=None, help="stages (patch classifier, default 4) or U-Net levels (default 4)"
    )
    p.add_argument(
        "--dim",
        choices=("auto", "2", "3"),
        default=None,
        help="2, 3 or auto (the default): 2 for section rasters, else 3",
    )
    _option(
        p,
        "--patch-size",
        type=int,
        nargs="+",
        default_of=f"{_CHOICES}:DEFAULT_PATCH_SIZE",
        help="celltype window P (odd; one or per axis)",
    )
    _option(
        p,
        "--tile-size",
        type=int,
        nargs="+",
        default_of=f"{_CHOICES}:DEFAULT_TILE_SIZE",
        help="region tile (voxels; one or per axis)",
    )
    architecture = p.add_argument(
        "--architecture",
        choices=_HEADS,
        metavar="HEAD",
        default=None,
        help="the zoo head the model is built with: cell-context (own expression + invariant context, per cell), "
        "patch (patch classifier), segment (U-Net); default %(per_task)s",
    )
    architecture.per_task = _PerTask("default_architecture")  # type: ignore[attr-defined]
    _option(
        p,
        "--split-fractions",
        type=float,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        default_of=f"{_CHOICES}:DEFAULT_FRACTIONS",
        help="fractions of the sections per split",
    )
    _option(
        p,
        "--split-blocks",
        type=int,
        default_of=f"{_CHOICES}:DEFAULT_SPLIT_BLOCKS",
        help="contiguous blocks of sections per split, interleaved along z so that every split spans the brain",
    )
    p.add_argument(
        "--split-block-size",
        type=float,
        default=None,
        metavar="MM",
        help="split whole square blocks of this size (mm) inside the sections instead of whole sections "
        "(datasets of one or a few sections)",
    )


def _atlas_data_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """:func:`abc_pipeline.learn.atlas.atlas_data` keywords of :func:`_add_atlas_data_options`."""

    def one_or_all(sizes: list[int] | None) -> int | list[int] | None:
        return sizes[0] if sizes is not None and len(sizes) == 1 else sizes

    return {
        "level": a.level,
        "architecture": a.architecture,
        **_given(
            dim=a.dim if a.dim in (None, "auto") else int(a.dim),
            patch_size=one_or_all(a.patch_size),
            tile_size=one_or_all(a.tile_size),
            split_fractions=a.split_fractions,
            split_blocks=a.split_blocks,
            split_block_size=a.split_block_size,
        ),
    }


def _add_baseline_options(p: argparse.ArgumentParser) -> None:
    """Options of the scikit-learn baselines (``train --model logreg-*``; :func:`_baseline_kwargs`)."""
    _option(
        p,
        "--neighbors",
        type=int,
        default_of=f"{_CHOICES}:DEFAULT_NEIGHBORS",
        help="logreg-neighborhood: nearest cells of the same section averaged into the features",
    )
    _option(
        p,
        "--max-train-cells",
        type=int,
        default_of=f"{_CHOICES}:DEFAULT_MAX_TRAIN_CELLS",
        help="baselines: training cells used at most (seeded class-stratified subsample)",
    )
    _option(p, "--logreg-c", type=float, default_of=f"{_CHOICES}:DEFAULT_C", help="baselines: inverse regularisation C")


def _baseline_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """:func:`abc_pipeline.learn.baselines.train_baseline` keywords: the atlas data (but the window and
    architecture), baseline and seed options."""
    data = _atlas_data_kwargs(a)
    return {
        **{k: data[k] for k in ("level", "dim", "split_fractions", "split_blocks") if k in data},
        **_given(seed=a.seed, neighbors=a.neighbors, max_train_cells=a.max_train_cells, c=a.logreg_c),
    }


# --------------------------------------------------------------------------------------------- atlas
def _add_synth(sub: argparse._SubParsersAction) -> None:
    default_of = "abc_pipeline.atlas.synthetic:write_synthetic_release"
    p = sub.add_parser("synth", help="write a synthetic ABC release tree (manifest, CSVs, h5ad) for demos and tests")
    p.add_argument("--out", type=Path, required=True, help="release root to create (a bucket-like tree)")
    p.add_argument(
        "--cells", type=int, default=20000, help="number of cells in the expression file (default: %(default)s)"
    )
    _option(p, "--seed", type=int, default_of=default_of)
    _option(p, "--release", default_of=default_of, help="release version written into the manifest")
    _option(
        p,
        "--chunk-cells",
        type=_positive_int,
        default_of=default_of,
        help="cells generated per chunk (sets peak memory)",
    )
    p.add_argument(
        "--sections",
        type=int,
        default=None,
        help="sections, 0.2 mm apart (1-59; default: about one per 10,000 cells, at least 4)",
    )
    _add_no_progress(p)

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.atlas.synthetic import write_synthetic_release

        write_synthetic_release(
            a.out,
            n_cells=a.cells,
            n_sections=a.sections,
            progress=not a.no_progress,
            **_given(seed=a.seed, release=a.release, chunk_cells=a.chunk_cells),
        )

    p.set_defaults(run=run)


def _add_download(sub: argparse._SubParsersAction) -> None:
    default_of = "abc_pipeline.atlas.download:download_dataset"
    p = sub.add_parser("download", help="download (resume, verify MD5) the files a dataset needs")
    _add_dataset(p)
    _option(p, "--release", default_of=default_of, help="release version (YYYYMMDD) or 'latest' (needs network)")
    _option(p, "--base-url", default_of=default_of, help="bucket root URL (https://, http:// or file://)")
    p.add_argument(
        "--cache", type=Path, required=True, help="local mirror root (files land at <cache>/<relative_path>)"
    )
    _option(p, "--jobs", type=_positive_int, default_of=default_of, help="files downloaded in parallel")
    _option(p, "--retries", type=_positive_int, default_of=default_of, help="attempts per file before giving up")
    _add_no_progress(p)
    p.add_argument(
        "--summary", type=Path, default=None, help="write a JSON record of the run (files, fetched, skipped)"
    )

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.atlas.download import download_dataset

        summary = download_dataset(
            a.dataset,
            cache_dir=a.cache,
            progress=not a.no_progress,
            **_given(release=a.release, base_url=a.base_url, jobs=a.jobs, retries=a.retries),
        )
        if a.summary is not None:
            summary.write_json(a.summary)

    p.set_defaults(run=run)


def _add_assemble(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "assemble", help="join metadata, taxonomy, parcellation, coordinates, log2 expression -> cells.zarr"
    )
    _add_dataset(p)
    p.add_argument("--release", default=None, help="release version; default: the newest manifest in the cache")
    p.add_argument("--cache", type=Path, required=True, help="local mirror root written by `download`")
    p.add_argument("--out", type=Path, required=True, help="output AnnData store, e.g. results/<dataset>/cells.zarr")
    _option(
        p,
        "--chunk-cells",
        type=_positive_int,
        default_of="abc_pipeline.atlas.assemble:assemble_dataset",
        help="cells per chunk (sets peak memory)",
    )
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_no_progress(p)

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.atlas.assemble import assemble_dataset

        assemble_dataset(
            a.dataset,
            cache_dir=a.cache,
            out=a.out,
            release=a.release,
            progress=not a.no_progress,
            overwrite=a.overwrite,
            **_given(chunk_cells=a.chunk_cells),
        )

    p.set_defaults(run=run)


def _add_import(sub: argparse._SubParsersAction) -> None:
    from abc_pipeline.atlas.user_options import KINDS

    p = sub.add_parser("import", help="import your own spatial AnnData (h5ad/zarr) or MERSCOPE folder -> cells.zarr")
    p.add_argument("--kind", choices=KINDS, required=True, help="anndata (.h5ad / .zarr) or merscope (output folder)")
    p.add_argument("--input", type=Path, required=True, help="the AnnData file/store or the MERSCOPE folder")
    p.add_argument("--out", type=Path, required=True, help="cells.zarr to write, e.g. results/<dataset>/cells.zarr")
    _add_user_data_options(p)
    p.add_argument("--section-name", default=None, help="name of the one section (default: the input's name)")
    p.add_argument(
        "--labels", nargs="*", default=None, metavar="COLUMN", help="obs columns to keep as categorical labels"
    )
    _option(
        p,
        "--chunk-cells",
        type=int,
        default_of="abc_pipeline.atlas.user_options:DEFAULT_CHUNK_CELLS",
        help="cells per chunk (sets peak memory)",
    )
    _add_no_progress(p)

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.atlas.import_user import import_user_data

        import_user_data(
            a.kind,
            a.input,
            a.out,
            section_name=a.section_name,
            progress=not a.no_progress,
            **_user_data_kwargs(a),
            **_given(labels=a.labels, chunk_cells=a.chunk_cells),
        )

    p.set_defaults(run=run)


# --------------------------------------------------------------------------------------------- raster
def _add_rasterize(sub: argparse._SubParsersAction) -> None:
    default_of = "abc_pipeline.raster.rasterize:rasterize"
    p = sub.add_parser(
        "rasterize", help="rasterize cells.zarr into a multichannel OME-Zarr grid (c,z,y,x) + label volumes"
    )
    p.add_argument("--cells", type=Path, required=True, help="cells.zarr written by `assemble`")
    p.add_argument(
        "--out", type=Path, required=True, help="raster to write, e.g. results/<dataset>/raster/<grid>.ome.zarr"
    )
    _option(
        p,
        "--space",
        choices=_LibraryNames("abc_pipeline.raster.grid:SPACES"),
        metavar="SPACE",
        default_of=default_of,
        help="%(choices)s; section: 2D per section (z = section order); reconstructed / ccf: 3D",
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
    _option(p, "--margin", type=int, default_of=default_of, help="empty voxels added around the data extent (per side)")
    ch = p.add_mutually_exclusive_group()
    ch.add_argument(
        "--genes", nargs="+", metavar="GENE", help="channel genes (symbols or ids); default: all non-blank genes"
    )
    ch.add_argument("--genes-file", type=Path, help="text file with one gene per line")
    p.add_argument(
        "--pca", type=int, metavar="K", help="use the first K principal components (of the genes) as channels"
    )
    _option(p, "--pca-sample", type=int, default_of=default_of, help="cells sampled to fit the PCA")
    p.add_argument(
        "--labels",
        nargs="*",
        metavar="COLUMN",
        help="categorical obs columns to rasterize as majority labels (default: class subclass "
        "parcellation_division parcellation_structure, those present; --labels alone: none)",
    )
    _option(p, "--levels", type=int, default_of=default_of, help="pyramid levels (>= 2)")
    _option(
        p,
        "--chunk-cells",
        type=_positive_int,
        default_of="abc_pipeline.raster.rasterize:DEFAULT_CHUNK_CELLS",
        help="cells per Dask task (sets peak memory)",
    )
    _option(
        p,
        "--scheduler",
        choices=_LibraryNames("abc_pipeline.raster.rasterize:SCHEDULERS"),
        metavar="SCHEDULER",
        default_of=default_of,
        help="local Dask scheduler: %(choices)s",
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
    _option(
        p,
        "--max-voxels",
        type=_positive_int,
        default_of=default_of,
        help="largest grid accepted, in voxels (a larger grid is almost always a wrong voxel size)",
    )
    p.add_argument(
        "--drop-nonfinite",
        action="store_true",
        help="skip cells with NaN or inf in X (counted and logged) instead of failing",
    )
    _option(p, "--seed", type=int, default_of=default_of, help="seed of the PCA sample")
    _option(
        p,
        "--max-accumulator-gb",
        type=float,
        default_of=default_of,
        help="local threaded runs sum voxels in memory when the occupied voxels' sums fit this (GB); "
        "else they spill to disk",
    )
    _add_no_progress(p)

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
            voxel_size=a.voxel_size,
            bounds=bounds,
            genes=genes,
            pca=a.pca,
            labels=a.labels,
            num_workers=a.workers,
            address=a.address,
            overwrite=a.overwrite,
            progress=not a.no_progress,
            drop_nonfinite=a.drop_nonfinite,
            **_given(
                space=a.space,
                margin=a.margin,
                pca_sample=a.pca_sample,
                levels=a.levels,
                chunk_cells=a.chunk_cells,
                scheduler=a.scheduler,
                seed=a.seed,
                max_accumulator_gb=a.max_accumulator_gb,
                max_voxels=a.max_voxels,
            ),
        )

    p.set_defaults(run=run)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="print the zoo's first-layer channels and parameter counts (parameter matching)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=3, help="spatial dimensions (default: %(default)s)")
    p.add_argument("--in-channels", type=int, required=True, help="image channels (input scalar fields)")
    p.add_argument("--classes", type=int, required=True, help="number of classes")
    _option(
        p,
        "--head",
        choices=_HEADS,
        metavar="HEAD",
        default_of="abc_pipeline.nn.zoo:print_model_table",
        help="what the networks output: %(choices)s",
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
            target_params=a.target_params,
            width=a.width,
            spacing=a.spacing,
            **_given(head=a.head),
        )

    p.set_defaults(run=run)


# --------------------------------------------------------------------------------------------- learn
def _add_train_npz(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-npz", help="train and test a zoo model on a MedMNIST-format .npz file")
    p.add_argument(
        "--npz", required=True, help="MedMNIST-format .npz path, or a MedMNIST name (needs medmnist + network)"
    )
    p.add_argument(
        "--model", required=True, choices=_ZOO_MODELS, metavar="MODEL", help="zoo model: %(choices)s (see docs/nn.md)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output directory (checkpoint.pt, last.pt, history.tsv, metrics.json)"
    )
    _add_model_size_options(p)
    _add_training_options(p)
    _option(p, "--metric", default_of=f"{_CHOICES}:DEFAULT_METRIC", help="validation metric for early stopping")
    _add_download_root(p)
    p.add_argument("--restart", action="store_true", help="ignore OUT/last.pt and train from scratch")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.run_npz import train_npz

        train_npz(
            a.npz,
            a.model,
            a.out,
            width=a.width,
            target_params=a.target_params,
            resume=not a.restart,
            **_training_kwargs(a),
            **_given(metric=a.metric, download_root=a.download_root),
        )

    p.set_defaults(run=run)


def _add_bench_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-models", help="train zoo models parameter-matched on one dataset; one comparison table")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--npz", help="MedMNIST-format .npz path, or a MedMNIST name (needs medmnist + network)")
    data.add_argument("--raster", type=Path, help="an atlas raster (OME-Zarr from `rasterize`); needs --task")
    _add_task(p, required=False, text="atlas task (with --raster)")
    _add_atlas_data_options(p)
    p.add_argument(
        "--out", type=Path, required=True, help="output directory (table, figures, one run folder per model)"
    )
    _option(
        p,
        "--models",
        nargs="+",
        choices=_MODELS,
        metavar="MODEL",
        default_of=f"{_CHOICES}:BENCH_MODELS",
        help="models to compare: %(choices)s (the scikit-learn baselines logreg-* with --raster only)",
    )
    _add_baseline_options(p)
    _option(
        p,
        "--target-params",
        type=int,
        default_of=f"{_CHOICES}:BENCH_TARGET_PARAMS",
        help="parameters per model (width solved per model)",
    )
    _option(
        p,
        "--train-fraction",
        type=float,
        default_of=f"{_CHOICES}:BENCH_TRAIN_FRACTION",
        help="keep this fraction of the training data: a stratified subset of the samples (--npz) or "
        "evenly spaced training sections (--raster)",
    )
    _option(
        p,
        "--subset-seed",
        type=int,
        default_of=f"{_CHOICES}:DEFAULT_SEED",
        help="seed of the training-split subset (--npz)",
    )
    p.add_argument(
        "--max-samples", type=int, default=None, help="celltype: cap the cells of every split (fixed subset)"
    )
    _add_training_options(p, epochs="BENCH_EPOCHS")
    _add_curve_angles(p, f"{_CHOICES}:BENCH_CURVE_ANGLES", "must include 45")
    _option(
        p,
        "--curve-samples",
        type=int,
        default_of=f"{_CHOICES}:BENCH_CURVE_SAMPLES",
        help="test samples in the equivariance curve",
    )
    _add_download_root(p)
    p.add_argument("--restart", action="store_true", help="retrain every model from scratch")

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.choices import BENCH_MODELS, is_baseline
        from abc_pipeline.learn.compare import bench_models, format_table, npz_task

        models = a.models or BENCH_MODELS
        zoo, baselines = [m for m in models if not is_baseline(m)], [m for m in models if is_baseline(m)]
        if baselines and a.npz is not None:
            raise InputError(
                f"--models {' '.join(baselines)}: the baselines read each cell's expression; they need "
                f"an atlas (--raster and --cells), not --npz"
            )
        if a.npz is not None:
            task = npz_task(
                a.npz, **_given(train_fraction=a.train_fraction, seed=a.subset_seed, download_root=a.download_root)
            )
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
                **_atlas_data_kwargs(a),
                **_given(seed=a.seed, train_sections=a.train_fraction),
            )
        extra = []
        if baselines:
            from abc_pipeline.learn.baselines import bench_baseline_rows
            from abc_pipeline.learn.tasks import by_name

            test = task.test
            extra = bench_baseline_rows(
                a.raster,
                a.cells,
                a.task,
                baselines,
                a.out,
                test_rows=getattr(test, "cells", None),
                test_targets=None if by_name(a.task).per_voxel else test.targets.numpy(),
                **_baseline_kwargs(a),
                **_given(train_sections=a.train_fraction),
            )
        table = bench_models(
            task,
            a.out,
            zoo,
            resume=not a.restart,
            extra_rows=extra,
            **_training_kwargs(a),
            **_given(target_params=a.target_params, angles=a.angles, curve_samples=a.curve_samples),
        )
        print(format_table(table))

    p.set_defaults(run=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a zoo model on a raster: cell types (patch classifier) or regions (U-Net)")
    p.add_argument("--raster", type=Path, required=True, help="OME-Zarr raster (abc-pipeline rasterize)")
    _add_task(p, required=True)
    _add_atlas_data_options(p)
    p.add_argument(
        "--model",
        required=True,
        choices=_MODELS,
        metavar="MODEL",
        help="zoo network or scikit-learn baseline (logreg-*): %(choices)s (docs/nn.md)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="run directory, e.g. results/<dataset>/models/<task>/<model>/"
    )
    _add_baseline_options(p)
    _add_model_size_options(p)
    _add_training_options(p)
    p.add_argument(
        "--max-samples-per-epoch", type=int, default=None, help="celltype: cap cells per split (fixed subset)"
    )
    _option(
        p,
        "--neighborhood-radii",
        type=float,
        nargs="*",
        metavar="VOXELS",
        default_of=f"{_CHOICES}:DEFAULT_NEIGHBORHOOD_RADII",
        help="cell-context models: disc radii of the neighbourhood means, in voxels (none given: no means)",
    )
    _option(
        p,
        "--class-weights",
        choices=_CLASS_WEIGHTS,
        metavar="WEIGHTS",
        default_of=f"{_CHOICES}:DEFAULT_CLASS_WEIGHTS",
        help="loss weights: %(choices)s; none: per-cell accuracy, as the baselines; balanced: inverse class "
        "frequency (balanced accuracy, mean Dice); auto: none for per-cell models, balanced for U-Nets",
    )
    restart = p.add_mutually_exclusive_group()
    restart.add_argument("--restart", action="store_true", help="ignore OUT/last.pt and train from scratch")
    restart.add_argument(
        "--restart-if-changed",
        action="store_true",
        help="resume OUT/last.pt only if it has this run's configuration, else start over "
        "(default: refuse to mix runs)",
    )

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.choices import is_baseline

        if is_baseline(a.model):
            from abc_pipeline.learn.baselines import train_baseline

            train_baseline(a.raster, a.cells, a.task, a.model, a.out, **_baseline_kwargs(a))
            return
        from abc_pipeline.learn.atlas import train_atlas_task

        train_atlas_task(
            a.raster,
            a.cells,
            a.task,
            a.model,
            a.out,
            width=a.width,
            target_params=a.target_params,
            depth=a.depth,
            max_samples_per_epoch=a.max_samples_per_epoch,
            resume="if-unchanged" if a.restart_if_changed else not a.restart,
            **_training_kwargs(a),
            **_atlas_data_kwargs(a),
            **_given(neighborhood_radii=a.neighborhood_radii, class_weights=a.class_weights),
        )

    p.set_defaults(run=run)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="dense prediction over a raster (OME-Zarr labels + probabilities) and per cell")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt of abc-pipeline train")
    p.add_argument("--raster", type=Path, required=True, help="OME-Zarr raster with the training channels")
    p.add_argument(
        "--cells", type=Path, default=None, help="cells.zarr of the raster (checks cell order, scores test cells)"
    )
    p.add_argument("--out", type=Path, required=True, help="predictions.zarr to write (replaced atomically)")
    _option(
        p,
        "--tile-size",
        type=int,
        nargs="+",
        default_of=f"{_CHOICES}:PREDICT_TILE",
        help="tile core by raster dimensions (axes are split into equal cores)",
    )
    _option(
        p,
        "--halo",
        type=int,
        nargs="+",
        default_of=f"{_CHOICES}:PREDICT_HALO",
        help="region U-Net context per side",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tiles per forward pass (default: as many as a voxel budget allows, 32k voxels on CPU)",
    )
    _add_device(p, f"{_CHOICES}:DEFAULT_DEVICE")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_no_progress(p)

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.predict import predict_raster

        one = lambda v: v[0] if v is not None and len(v) == 1 else v  # noqa: E731
        predict_raster(
            a.checkpoint,
            a.raster,
            a.out,
            cells=a.cells,
            batch_size=a.batch_size,
            progress=not a.no_progress,
            overwrite=a.overwrite,
            **_given(tile_size=one(a.tile_size), halo=one(a.halo), device=a.device),
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
    _option(
        p,
        "--windows",
        type=int,
        default_of=f"{_CHOICES}:EVALUATE_WINDOWS",
        help="test windows (sections / z-slabs) the model runs on",
    )
    _option(
        p,
        "--window-size",
        type=int,
        default_of=f"{_CHOICES}:EVALUATE_WINDOW",
        help="window side in voxels, in-plane, by raster dimensions",
    )
    _option(
        p, "--window-depth", type=int, default_of=f"{_CHOICES}:EVALUATE_WINDOW_DEPTH", help="3D: z indices per window"
    )
    _option(
        p,
        "--halo",
        type=int,
        default_of=f"{_CHOICES}:PREDICT_HALO",
        help="region: U-Net context read around each window (per side)",
    )
    _add_curve_angles(p, f"{_CHOICES}:EVALUATE_CURVE_ANGLES", "in-plane")
    _option(
        p,
        "--map-sections",
        type=int,
        default_of=f"{_CHOICES}:EVALUATE_MAP_SECTIONS",
        help="test sections / z-slices in maps.png",
    )
    _option(
        p,
        "--max-test-cells",
        type=int,
        default_of=f"{_CHOICES}:EVALUATE_MAX_TEST_CELLS",
        help="celltype: test cells scored (evenly strided)",
    )
    _option(p, "--batch-size", type=int, default_of=f"{_CHOICES}:EVALUATE_BATCH_SIZE", help="windows per forward pass")
    _add_device(p, f"{_CHOICES}:DEFAULT_DEVICE")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _option(
        p,
        "--any-angles",
        type=float,
        nargs="+",
        default_of=f"{_CHOICES}:DEFAULT_ANY_ANGLES",
        help="in-plane rotations (degrees) of the test sections in the any-angle score",
    )
    _option(
        p,
        "--any-angle-sections",
        type=int,
        default_of=f"{_CHOICES}:DEFAULT_ANY_ANGLE_SECTIONS",
        help="test sections (3D: test z-blocks) rotated in the any-angle score",
    )

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.evaluate_run import evaluate_run

        evaluate_run(
            a.checkpoint,
            a.raster,
            a.predictions,
            a.out,
            cells=a.cells,
            overwrite=a.overwrite,
            **_given(
                windows=a.windows,
                window_size=a.window_size,
                window_depth=a.window_depth,
                halo=a.halo,
                angles=a.angles,
                map_sections=a.map_sections,
                max_test_cells=a.max_test_cells,
                batch_size=a.batch_size,
                device=a.device,
                any_angles=a.any_angles,
                any_angle_sections=a.any_angle_sections,
            ),
        )

    p.set_defaults(run=run)


def _add_transfer(sub: argparse._SubParsersAction) -> None:
    from abc_pipeline.learn.choices import TRANSFER_KINDS

    p = sub.add_parser("transfer", help="annotate your own data (AnnData, MERSCOPE, cells.zarr) with trained models")
    p.add_argument(
        "--checkpoint", type=Path, nargs="+", required=True, help="checkpoint.pt files of abc-pipeline train"
    )
    p.add_argument(
        "--input", type=Path, required=True, help="your .h5ad / .zarr, MERSCOPE folder or imported cells.zarr"
    )
    _option(p, "--kind", choices=TRANSFER_KINDS, default_of=f"{_CHOICES}:DEFAULT_TRANSFER_KIND", help="what --input is")
    p.add_argument("--out", type=Path, required=True, help="annotated .h5ad to write (a copy of your AnnData)")
    _add_user_data_options(p)
    p.add_argument(
        "--fill-missing-genes",
        action="store_true",
        help="read the model's genes that the data lacks as 0 (warned and recorded) instead of refusing",
    )
    _add_device(p, f"{_CHOICES}:DEFAULT_DEVICE")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass (default: a voxel budget)")
    _add_no_progress(p)

    def run(a: argparse.Namespace) -> None:
        from abc_pipeline.learn.transfer import transfer

        transfer(
            a.checkpoint,
            a.input,
            a.out,
            fill_missing_genes=a.fill_missing_genes,
            batch_size=a.batch_size,
            progress=not a.no_progress,
            **_given(kind=a.kind, device=a.device),
            **({} if a.kind == "cells" else _user_data_kwargs(a)),
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
